"""The shared gRPC server bootstrap over real loopback sockets: health, reflection, error
mapping by the interceptor, graceful drain, and SIGTERM handling in a real process.

The servicer here is a probe for the bootstrap itself (the real Inference service is issue #3):
it raises each kind of error a service can raise, so the mapping is checked end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from swarmserve import native
from swarmserve.config import ServerSettings
from swarmserve.rpc import NotFound, RpcServer, ServiceBinding
from swarmserve.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


class ProbeInference(inference_pb2_grpc.InferenceServicer):
    async def Status(
        self, request: inference_pb2.StatusRequest, context: aio.ServicerContext
    ) -> inference_pb2.StatusResponse:
        return inference_pb2.StatusResponse(identity_key=b"k" * 32)

    async def Score(
        self, request: inference_pb2.ScoreRequest, context: aio.ServicerContext
    ) -> inference_pb2.ScoreResponse:
        if request.model == "missing":
            raise NotFound(f"no model named {request.model!r}")
        if request.model == "bad-value":
            raise ValueError("top_alternatives must be at most 20")
        if request.model == "tampered":
            raise native.CellAuthenticationError("forward cell failed authentication")
        raise RuntimeError("secret internal detail")

    async def Generate(
        self, request: inference_pb2.InferenceGenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.InferenceGenerateResponse]:
        for index in range(5):
            yield inference_pb2.InferenceGenerateResponse(
                token=inference_pb2.InferenceToken(token_id=index, text=b"t", index=index)
            )
            if request.model == "fails-midway" and index == 1:
                raise RuntimeError("engine crashed")
            await asyncio.sleep(0.2 if request.model == "slow" else 0)


@pytest.fixture
async def server() -> AsyncIterator[RpcServer]:
    binding = ServiceBinding(
        "swarmserve.v1.Inference",
        lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(ProbeInference(), s),
    )
    rpc = RpcServer(ServerSettings(listen="127.0.0.1:0", grace_period_s=5), [binding])
    await rpc.start()
    yield rpc
    await rpc.stop(0)


async def test_health_is_serving_once_started(server: RpcServer) -> None:
    async with aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ["", "swarmserve.v1.Inference"]:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(aio.AioRpcError) as missing:
            await stub.Check(health_pb2.HealthCheckRequest(service="swarmserve.v1.Nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_services(server: RpcServer) -> None:
    async with aio.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="swarmserve.v1.Inference"),
        ]
        replies = [reply async for reply in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "swarmserve.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # describe works


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND, "no model named 'missing'"),
        ("bad-value", grpc.StatusCode.INVALID_ARGUMENT, "top_alternatives must be at most 20"),
        ("tampered", grpc.StatusCode.INVALID_ARGUMENT, "failed authentication"),
        ("crash", grpc.StatusCode.INTERNAL, "internal error (incident "),
    ],
)
async def test_interceptor_maps_errors_to_status_codes(
    server: RpcServer, model: str, code: grpc.StatusCode, message: str
) -> None:
    async with aio.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(aio.AioRpcError) as error:
            await stub.Score(inference_pb2.ScoreRequest(model=model))
    assert error.value.code() == code
    assert message in (error.value.details() or "")
    assert "secret internal detail" not in (error.value.details() or "")


async def test_stream_error_after_tokens_keeps_what_was_sent(server: RpcServer) -> None:
    received = []
    async with aio.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(aio.AioRpcError) as error:
            async for reply in stub.Generate(inference_pb2.InferenceGenerateRequest(model="fails-midway")):
                received.append(reply.token.index)
    assert received == [0, 1]
    assert error.value.code() == grpc.StatusCode.INTERNAL


async def test_graceful_stop_lets_running_streams_finish(server: RpcServer) -> None:
    async with aio.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Generate(inference_pb2.InferenceGenerateRequest(model="slow"))
        first = await call.read()
        stopping = asyncio.create_task(server.stop(grace_s=5))
        rest = []
        while (reply := await call.read()) != aio.EOF:
            rest.append(reply)
        await stopping
        assert await call.code() == grpc.StatusCode.OK
    assert first.token.index == 0
    assert [r.token.index for r in rest] == [1, 2, 3, 4]


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio
        from swarmserve.config import ServerSettings
        from swarmserve.rpc import RpcServer
        from swarmserve.telemetry import configure_logging

        async def main():
            configure_logging(fmt="json")
            server = RpcServer(ServerSettings(listen="127.0.0.1:0", grace_period_s=2), [])
            await server.start()
            print(server.address, flush=True)
            server.stop_on_signals()
            await server.wait_for_termination()

        asyncio.run(main())
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()

        async def check() -> int:
            async with aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                return int(reply.status)

        assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
    lines = (
        [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
        if process.stderr
        else []
    )
    events = [line["event"] for line in lines]
    assert {"serving", "signal received", "draining", "stopped"} <= set(events)
    assert all("timestamp" in line and "level" in line for line in lines)


async def test_the_channel_pool_evicts_the_least_recently_used() -> None:
    from swarmserve.rpc import ChannelPool

    pool = ChannelPool(max_channels=2, grace_s=0.1)
    a, b = pool.get("127.0.0.1:1"), pool.get("127.0.0.1:2")
    assert pool.get("127.0.0.1:1") is a  # used again: b is now the oldest
    pool.get("127.0.0.1:3")
    assert len(pool) == 2
    assert pool.get("127.0.0.1:1") is a  # kept
    assert pool.get("127.0.0.1:2") is not b  # evicted (and closed), so a new one
    assert len(pool) == 2
    await pool.close()


async def test_the_health_command_exits_zero_only_for_a_serving_node(
    server: RpcServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``swarmserve health [HOST:PORT]``, the containers' HEALTHCHECK (by default the address
    the node listens on, from its environment): SERVING is 0; a service the node does not have,
    a node still loading (NOT_SERVING) and nothing listening are 1."""
    from services.cli import main

    assert await asyncio.to_thread(main, ["health", server.address]) == 0
    monkeypatch.setenv("SWARMSERVE_SERVER__LISTEN", f"0.0.0.0:{server.address.rpartition(':')[2]}")
    assert await asyncio.to_thread(main, ["health"]) == 0
    assert await asyncio.to_thread(main, ["health", server.address, "--service", "swarmserve.v1.Inference"]) == 0
    assert await asyncio.to_thread(main, ["health", server.address, "--service", "swarmserve.v1.Nope"]) == 1
    loading = RpcServer(ServerSettings(listen="127.0.0.1:0"), [])
    await loading.start(serving=False)
    try:
        assert await asyncio.to_thread(main, ["health", loading.address]) == 1
    finally:
        await loading.stop(0)
    assert await asyncio.to_thread(main, ["health", loading.address, "--timeout", "1"]) == 1
