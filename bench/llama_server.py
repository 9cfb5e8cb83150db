"""llama.cpp's own OpenAI-compatible server (``python -m llama_cpp.server``, from
llama-cpp-python[server]) on the embedded model: the single-node peer the benchmarks compare
the swarm with, on the same GGUF file and threads."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

from services.inference.models import DEFAULT_MODEL_NAME, default_model_path

__all__ = ["start_llama_server"]


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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("llama_cpp.server did not start")
