"""Shared fixtures: real inference nodes (real llama.cpp, real sockets) on loopback."""

from __future__ import annotations

import ctypes
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from services.inference.config import InferenceConfig, ModelSettings, ProviderPolicy
from services.inference.models import default_model_path
from services.inference.node import InferenceNode
from swarmserve.config import GossipSettings, ServerSettings
from swarmserve.rpc.node import ServiceNode

MODEL = "smollm2-135m-instruct"
# Gossip at test speed: a 0.2 s protocol period, so failures are noticed in about a second.
FAST_GOSSIP = GossipSettings(probe_interval_s=0.2, probe_timeout_s=0.1, suspicion_mult=3, sync_interval_s=2)


def joining(started: Sequence[ServiceNode], gossip: GossipSettings = FAST_GOSSIP) -> GossipSettings:
    """Gossip settings for a node that joins through the first node started (the first itself
    has no seed), as nodes on separate machines would: nobody is given the member list."""
    return gossip.model_copy(update={"seeds": [started[0].address] if started else []})


@pytest.fixture(scope="session")
def q2k_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A degraded copy of the default model, re-quantized to Q2_K with llama.cpp."""
    path = tmp_path_factory.mktemp("models") / "smollm2-q2k.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(
        str(default_model_path()).encode(), str(path).encode(), ctypes.byref(params)
    )
    assert status == 0, "llama_model_quantize failed"
    return path


NodeFactory = Callable[..., AbstractAsyncContextManager[InferenceNode]]


@pytest.fixture
def inference_node(tmp_path: Path) -> NodeFactory:
    """``async with inference_node(policy=..., models=...) as node`` starts a node on a free
    loopback port and stops it afterwards."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[InferenceNode]:
        settings: dict[str, Any] = {
            "data_dir": tmp_path / "node",
            "server": ServerSettings(listen="127.0.0.1:0", grace_period_s=2),
            "models": [ModelSettings(name=MODEL, context_length=1024)],
            "policy": ProviderPolicy(max_concurrent=1, max_queue=4, max_new_tokens=256, default_new_tokens=16),
        }
        settings.update(overrides)
        node = InferenceNode(InferenceConfig(**settings))
        await node.start()
        try:
            yield node
        finally:
            await node.stop(0)

    return start
