"""The private serving path end to end, over real sockets with the real SmolLM2 model: a router,
relays that peel exactly one layer, and inference nodes that terminate the circuits.

Covers: text through 3 hops equals text direct; relays never see plaintext (every cell they
receive is captured); receipts check out at the client; a tampered cell (either direction), a
replayed set-up, a relay dying mid-stream, an unknown model, an oversized request; signed
descriptors; `swarmserve up` / `generate` as processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from services.inference.config import InferenceConfig, ModelSettings, ProviderPolicy
from services.inference.node import InferenceNode
from services.relay.config import CircuitSettings
from services.relay.servicer import RelayServicer
from swarmserve import native
from swarmserve.client import generate
from swarmserve.config import ServerSettings
from swarmserve.overlay import DEAD, PeerDirectory, sign_descriptor
from swarmserve.rpc import STREAM_EOF, open_stream
from swarmserve.swarm import free_port_block
from swarmserve.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.conftest import FAST_GOSSIP, MODEL, SwarmFactory

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Tell me about the moon in two sentences."


DATA_PLANES = ["link", "circuit-rpc"]
_CELL_HEADER = 10  # circuit id u32 | kind u8 | reason u8 | length u32 (native/src/link.rs)
_CREATE, _DATA = 1, 3


def link_cells(frame: bytes) -> list[tuple[int, int, int]]:
    """(kind, payload offset, payload length) of each cell of a link frame."""
    cells, at = [], 0
    while at < len(frame):
        kind, length = frame[at + 4], int.from_bytes(frame[at + 6 : at + 10], "big")
        cells.append((kind, at + _CELL_HEADER, length))
        at += _CELL_HEADER + length
    return cells


class HostileRelay(RelayServicer):
    """A relay that sees every cell it receives from either neighbour, on both data planes: a
    ``Relay.Circuit`` cell, or a ``Relay.Link`` frame (whichever way it came), which it may
    replace (:meth:`_seen`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        links = self.links
        receive = links._receive

        def seeing(link: Any, cells: bytes) -> bool:
            backward = links._dialled.get(link.peer) == link.id  # from the next hop
            return receive(link, self._seen_frame(cells, backward))

        links._receive = seeing  # type: ignore[method-assign]

    def _seen_frame(self, frame: bytes, backward: bool) -> bytes:
        return frame

    def _seen(self, cell: relay_pb2.RelayCell, backward: bool) -> relay_pb2.RelayCell:
        return cell

    def Circuit(self, request_iterator: Any, context: Any) -> Any:
        async def seeing() -> AsyncIterator[relay_pb2.RelayCell]:
            async for cell in request_iterator:
                yield self._seen(cell, False)

        return super().Circuit(seeing(), context)

    async def _receive(self, call: Any) -> Any:
        cell = await super()._receive(call)
        return cell if cell is STREAM_EOF else self._seen(cell, True)


class CapturingRelay(HostileRelay):
    """Records every cell this relay receives, from either neighbour (serialized, or whole frames)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[bytes] = []
        self.first_creates: list[bytes] = []

    def _seen_frame(self, frame: bytes, backward: bool) -> bytes:
        self.received.append(frame)
        for kind, at, length in link_cells(frame):
            if kind == _CREATE and not backward:
                self.first_creates.append(frame[at : at + length])
        return frame

    def _seen(self, cell: relay_pb2.RelayCell, backward: bool) -> relay_pb2.RelayCell:
        self.received.append(cell.SerializeToString())
        if cell.WhichOneof("cell") == "create":
            self.first_creates.append(cell.create.onion)
        return cell


class TamperingRelay(HostileRelay):
    """Flips one byte of the first data cell it handles in the chosen direction."""

    direction = "backward"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tampered = False

    def _seen_frame(self, frame: bytes, backward: bool) -> bytes:
        if self.tampered or backward != (self.direction == "backward"):
            return frame
        for kind, at, length in link_cells(frame):
            if kind == _DATA:
                self.tampered = True
                flipped = bytearray(frame)
                flipped[at + length // 2] ^= 0x40
                return bytes(flipped)
        return frame

    def _seen(self, cell: relay_pb2.RelayCell, backward: bool) -> relay_pb2.RelayCell:
        if self.tampered or backward != (self.direction == "backward") or cell.WhichOneof("cell") != "data":
            return cell
        self.tampered = True
        payload = bytearray(cell.data.payload)
        payload[len(payload) // 2] ^= 0x40
        return relay_pb2.RelayCell(data=relay_pb2.DataCell(payload=bytes(payload)))


def chat_request(prompt: str = PROMPT, hops: int | None = None, **sampling: Any) -> router_pb2.GenerateRequest:
    request = router_pb2.GenerateRequest(model=MODEL, sampling=common_pb2.SamplingParams(**sampling))
    request.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=prompt)
    if hops is not None:
        request.privacy.hops = hops
    return request


async def run(
    address: str, request: router_pb2.GenerateRequest
) -> tuple[list[router_pb2.TokenChunk], router_pb2.GenerateSummary]:
    chunks, summary = [], None
    async with aio.insecure_channel(address) as channel:
        async for reply in router_pb2_grpc.RouterStub(channel).Generate(request):
            if reply.HasField("token"):
                chunks.append(reply.token)
            else:
                summary = reply.summary
    assert summary is not None
    return chunks, summary


async def test_three_hops_equal_direct_and_the_receipt_checks_at_the_client(swarm: SwarmFactory) -> None:
    async with swarm() as s:
        direct = await generate(s.router.address, PROMPT, model=MODEL, hops=0, max_tokens=40)
        private = await generate(s.router.address, PROMPT, model=MODEL, hops=3, max_tokens=40)
        assert private.text == direct.text and private.token_ids == direct.token_ids and len(private.token_ids) > 5
        assert private.summary is not None and private.summary.hops == 3
        assert private.summary.served_by == s.inference[0].keys.identity.node_id
        assert private.receipt is not None and private.receipt.token_count == len(private.token_ids)
        cosigner = private.summary.receipt.cosignatures[0].signer_key
        assert cosigner == s.router.keys.identity.public_key
        # Streamed, not buffered: the first token arrived well before the last.
        assert private.time_to_first_token_s < private.total_s * 0.6


@pytest.mark.parametrize("data_plane", DATA_PLANES)
async def test_relays_never_see_plaintext(swarm: SwarmFactory, data_plane: str) -> None:
    async with swarm(relay_class=CapturingRelay, data_plane=data_plane) as s:
        chunks, summary = await run(s.router.address, chat_request(hops=3, max_new_tokens=40))
        answer = "".join(c.text for c in chunks).encode()
        engine = s.inference[0].servicer.service.engines[MODEL]  # type: ignore[union-attr]
        assert summary.hops == 3 and len(answer) > 20
        # What the inference node produced in plaintext, exactly: each token message.
        plaintexts = [
            inference_pb2.InferenceToken(
                token_id=c.token_ids[j], text=c.token_texts[j], index=c.index + j, logprob=c.logprobs[j]
            ).SerializeToString()
            for c in chunks
            for j in range(len(c.token_ids))
        ]
        secrets = [PROMPT.encode(), answer, engine.apply_chat_template([]).encode() or b"<|im_start|>", *plaintexts]
        for relay in s.relays:
            captured = relay.relay.received  # type: ignore[attr-defined]
            assert captured, "every relay was on the path"
            traffic = b"".join(captured)
            for secret in secrets:
                assert secret not in traffic
            for token in c_texts(chunks):
                assert token not in traffic
            # A relay cannot tell its position: every set-up it saw had the same size.
            assert {len(onion) for onion in relay.relay.first_creates} == {native.SETUP_CELL_SIZE}  # type: ignore[attr-defined]


def c_texts(chunks: list[router_pb2.TokenChunk]) -> list[bytes]:
    """Token texts long enough that finding one in ciphertext by chance is negligible."""
    return [t for c in chunks for t in c.token_texts if len(t) >= 5]


@pytest.mark.parametrize("data_plane", DATA_PLANES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
async def test_a_tampered_cell_ends_the_circuit_with_a_clear_error(
    swarm: SwarmFactory, direction: str, data_plane: str
) -> None:
    relay_class = type(f"Tamper{direction}", (TamperingRelay,), {"direction": direction})
    async with swarm(relays=1, relay_class=relay_class, data_plane=data_plane) as s:
        with pytest.raises(aio.AioRpcError) as error:
            await run(s.router.address, chat_request(hops=1, max_new_tokens=30))
        assert error.value.code() == grpc.StatusCode.DATA_LOSS
        assert "failed authentication" in (error.value.details() or "")
        assert s.relays[0].relay.tampered  # type: ignore[attr-defined]
        # Nothing else is affected: the node frees its slot and the swarm keeps serving.
        status = inference_pb2_grpc.InferenceStub(aio.insecure_channel(s.inference[0].address))
        for _ in range(50):
            if (await status.Status(inference_pb2.StatusRequest())).load.running == 0:
                break
            await asyncio.sleep(0.1)
        assert (await status.Status(inference_pb2.StatusRequest())).load.running == 0
        chunks, _ = await run(s.router.address, chat_request(hops=0, max_new_tokens=5))
        assert chunks


@pytest.mark.parametrize("data_plane", DATA_PLANES)
async def test_a_replayed_setup_is_refused_on_either_plane(swarm: SwarmFactory, data_plane: str) -> None:
    async with swarm(relay_class=CapturingRelay, data_plane=data_plane) as s:
        await run(s.router.address, chat_request(hops=3, max_new_tokens=3))
        relay = next(r for r in s.relays if r.relay.first_creates)  # type: ignore[attr-defined]
        onion = relay.relay.first_creates[0]  # type: ignore[attr-defined]
        async with aio.insecure_channel(relay.address) as channel:
            call = open_stream(relay_pb2_grpc.RelayStub(channel).Circuit)
            await call.write(relay_pb2.RelayCell(create=relay_pb2.CreateCircuit(onion=onion)))
            with pytest.raises(aio.AioRpcError) as error:
                await call.read()
            assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "replayed" in (error.value.details() or "")
            # The same set-up on a link: refused for that circuit alone, the link stays up.
            link = open_stream(relay_pb2_grpc.RelayStub(channel).Link)
            header = (7).to_bytes(4, "big") + bytes([_CREATE, 0]) + len(onion).to_bytes(4, "big")
            await link.write(relay_pb2.LinkFrame(cells=header + onion))
            reply = await link.read()
            assert reply.cells == (7).to_bytes(4, "big") + bytes([4, relay_pb2.DESTROY_REASON_REPLAY]) + bytes(4)
            link.cancel()


@pytest.mark.parametrize("data_plane", DATA_PLANES)
async def test_a_relay_dying_mid_stream_ends_it_with_unavailable_promptly(swarm: SwarmFactory, data_plane: str) -> None:
    async with swarm(relays=3, data_plane=data_plane) as s, aio.insecure_channel(s.router.address) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(
            chat_request("Write a long story about a dragon.", hops=3, max_new_tokens=400)
        )
        received = 0
        started = None
        with pytest.raises(aio.AioRpcError) as error:
            async for _ in call:
                received += 1
                if received == 3:
                    started = time.monotonic()
                    await s.relays[1].stop(0)  # whatever its position, it is on the path
        assert started is not None and time.monotonic() - started < 10
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            router_pb2.GenerateRequest(model="gpt-9", prompt="hi"),
            "NOT_FOUND",
            "no live inference node serves model 'gpt-9'",
        ),
        (router_pb2.GenerateRequest(model=MODEL, prompt="x" * 70_000), "INVALID_ARGUMENT", "accepts at most 65536"),
        (router_pb2.GenerateRequest(model=MODEL), "INVALID_ARGUMENT", "one of prompt or chat"),
        (router_pb2.GenerateRequest(prompt="hi"), "INVALID_ARGUMENT", "model is required"),
        (
            router_pb2.GenerateRequest(model=MODEL, prompt="hi", privacy=router_pb2.PrivacyOptions(hops=7)),
            "UNAVAILABLE",
            "only 3 live relays",
        ),
        (
            router_pb2.GenerateRequest(model=MODEL, prompt="hi", privacy=router_pb2.PrivacyOptions(hops=9)),
            "INVALID_ARGUMENT",
            "exceeds this router's maximum of 7",
        ),
        (chat_request(hops=2, temperature=7.0), "INVALID_ARGUMENT", "temperature must be in [0, 5]"),
    ],
    ids=[
        "unknown-model",
        "oversized",
        "no-input",
        "no-model",
        "too-few-relays",
        "too-many-hops",
        "bad-sampling-at-the-node",
    ],
)
async def test_bad_requests_get_precise_errors(
    swarm: SwarmFactory, request_: router_pb2.GenerateRequest, code: str, message: str
) -> None:
    async with swarm(relay_class=CapturingRelay) as s:
        with pytest.raises(aio.AioRpcError) as error:
            await run(s.router.address, request_)
        assert error.value.code().name == code
        assert message in (error.value.details() or "")
        if code != "INVALID_ARGUMENT" or "temperature" not in message:
            # Refused before any circuit was built: no relay saw a cell.
            assert all(not r.relay.received for r in s.relays)  # type: ignore[attr-defined]


async def test_router_views_and_descriptor_checks(swarm: SwarmFactory) -> None:
    async with swarm(inference_nodes=2) as s, aio.insecure_channel(s.router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        models = await stub.ListModels(router_pb2.ListModelsRequest())
        assert [(m.model.name, m.node_count, m.model.quantization) for m in models.models] == [(MODEL, 2, "Q4_1")]
        members = (await stub.GetSwarm(router_pb2.GetSwarmRequest())).members
        assert len(members) == 5
        relays = await stub.GetSwarm(router_pb2.GetSwarmRequest(role=common_pb2.NODE_ROLE_RELAY))
        assert {m.node_id for m in relays.members} == {r.keys.identity.node_id for r in s.relays}

    directory = PeerDirectory()
    identity = native.Identity.generate()
    descriptor = common_pb2.NodeDescriptor(
        identity_key=identity.public_key, version=5, address="127.0.0.1:1", onion_key=bytes(32)
    )
    signed = sign_descriptor(identity, descriptor)
    assert directory.offer(signed) is not None
    forged = common_pb2.SignedDescriptor(
        descriptor=signed.descriptor, signature=native.Identity.generate().sign(signed.descriptor)
    )
    assert directory.offer(forged) is None  # signed by a key other than the one inside
    tampered = common_pb2.SignedDescriptor(
        descriptor=signed.descriptor.replace(b"127.0.0.1:1", b"10.9.9.9:1"), signature=signed.signature
    )
    assert directory.offer(tampered) is None
    older = common_pb2.NodeDescriptor()
    older.CopyFrom(descriptor)
    older.version = 4
    older.address = "127.0.0.1:2"
    assert directory.offer(sign_descriptor(identity, older)) is None  # no rollback
    assert directory.peers()[0].descriptor.address == "127.0.0.1:1"


def test_swarmserve_up_and_generate_as_processes(tmp_path: Path) -> None:
    base = free_port_block(6)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--data-dir",
            str(tmp_path / "swarm"),
            "--ports-from",
            str(base),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 180
        line = ""
        while "router ready" not in line and time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line or up.poll() is None, "swarmserve up exited early"
        assert f"127.0.0.1:{base}" in line
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "generate",
                "Name a color.",
                "--router",
                f"127.0.0.1:{base}",
                "--hops",
                "3",
                "--max-tokens",
                "12",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() and "receipt     verified" in result.stderr and "through 3 relays" in result.stderr
        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
    logs = tmp_path / "swarm" / "logs"
    for name in ["router-1", "relay-1", "relay-2", "relay-3", "inference-1", "inference-2"]:
        assert '"event": "stopped"' in (logs / f"{name}.log").read_text(), f"{name} did not stop cleanly"
    # The router was given one seed and learned the other five members by gossip.
    router_log = (logs / "router-1.log").read_text()
    assert '"seeds": 1' in router_log and router_log.count('"event": "member joined"') >= 5


async def test_a_relay_bounds_its_circuits(swarm: SwarmFactory) -> None:
    async with (
        swarm(relays=1, circuits=CircuitSettings(max_circuits=1)) as s,
        aio.insecure_channel(s.router.address) as channel,
    ):
        stub = router_pb2_grpc.RouterStub(channel)
        long = stub.Generate(chat_request("Write a long story about a dragon.", hops=1, max_new_tokens=200))
        await long.read()  # the relay's one circuit is in use
        with pytest.raises(aio.AioRpcError) as error:
            await run(s.router.address, chat_request(hops=1, max_new_tokens=2))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        long.cancel()


async def test_an_idle_circuit_is_closed_by_the_relay(swarm: SwarmFactory) -> None:
    from services.relay.client import OpenCircuit
    from swarmserve.rpc import ServiceError

    async with swarm(relays=1, circuits=CircuitSettings(idle_timeout_s=0.5)) as s:
        relay = s.router.directory.alive(common_pb2.NODE_ROLE_RELAY)[0]
        exit_ = s.router.directory.alive(common_pb2.NODE_ROLE_INFERENCE)[0]
        circuit = await OpenCircuit.open(s.router.channels, [relay], exit_, setup_timeout_s=5, cell_timeout_s=10)
        started = time.monotonic()
        with pytest.raises(ServiceError, match="timed out") as error:
            await circuit.receive()  # nothing is sent: the relay gives up on the circuit
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 3
        # The relay counts the circuit closed right after sending the teardown.
        for _ in range(50):
            if s.relays[0].relay.active == 0:
                break
            await asyncio.sleep(0.05)
        assert s.relays[0].relay.active == 0


async def test_a_dead_inference_node_costs_clients_nothing_and_is_declared_dead_within_bounds(
    swarm: SwarmFactory,
) -> None:
    """A node that dies without a word: requests that would have gone to it are retried through
    the other node before any token (the failed circuit also starts gossip's suspicion of it),
    and the router declares it dead within the bound of swarmserve/overlay/membership.py: probed
    within n periods, suspected by the end of that period, dead after the suspicion timeout."""
    async with swarm(relays=3, inference_nodes=2) as s:
        dead, alive = s.inference
        await dead.membership.close(leave=False)  # dies: no goodbye to anyone
        await dead.server.stop(0)
        for i in range(4):  # some of these would go to the dead node: none fail
            chunks, summary = await run(
                s.router.address, chat_request(f"Say the number {i}.", hops=1, max_new_tokens=3)
            )
            assert chunks and summary.served_by == alive.keys.identity.node_id
        members = len(s.router.directory.members())
        bound = (members + 1) * FAST_GOSSIP.probe_interval_s + s.router.membership.suspicion_timeout_s() + 1.0
        started = time.monotonic()
        while (peer := s.router.directory.get(dead.keys.identity.node_id)) is not None and peer.state != DEAD:
            assert time.monotonic() - started < bound, f"not declared dead within {bound:.1f} s"
            await asyncio.sleep(0.05)


async def test_a_refusal_before_the_first_token_is_retried_on_another_node(swarm: SwarmFactory) -> None:
    """Whatever the failure before any token reached the client (here a node whose policy
    refuses the length asked: INVALID_ARGUMENT), the request is sent to another node."""
    strict = {"policy": ProviderPolicy(max_concurrent=1, max_queue=4, max_new_tokens=4, default_new_tokens=4)}
    async with swarm(relays=1, inference=[strict, {}]) as s:
        serving = s.inference[1]
        served = set()
        for i in range(6):  # the dispatch reaches the refusing node for some of them
            _, summary = await run(s.router.address, chat_request(f"Count to {i}.", hops=1, max_new_tokens=8))
            served.add(summary.served_by)
        assert served == {serving.keys.identity.node_id}
        retries = s.router.metrics.registry.get_sample_value("swarmserve_router_retries_total")
        assert retries, "no request was refused first"


async def test_a_joining_inference_node_receives_work_within_a_few_rounds(swarm: SwarmFactory, tmp_path: Path) -> None:
    async with swarm(relays=1, inference_nodes=1) as s:
        assert len(s.router.directory.alive(common_pb2.NODE_ROLE_INFERENCE)) == 1
        joining = InferenceNode(
            InferenceConfig(
                data_dir=tmp_path / "joining",
                server=ServerSettings(listen="127.0.0.1:0"),
                models=[ModelSettings(name=MODEL, context_length=1024)],
                policy=ProviderPolicy(max_concurrent=1),
                gossip=FAST_GOSSIP.model_copy(update={"seeds": [s.relays[0].address]}),  # knows one relay only
            )
        )
        await joining.start()
        try:
            started = time.monotonic()
            while len(s.router.directory.alive(common_pb2.NODE_ROLE_INFERENCE)) < 2:
                assert time.monotonic() - started < 10 * FAST_GOSSIP.probe_interval_s, "not picked up in a few rounds"
                await asyncio.sleep(0.05)
            await s.inference[0].stop(0)  # the old node leaves (and says so): the new one now serves
            _, summary = await run(s.router.address, chat_request("Say hi.", hops=1, max_new_tokens=3))
            assert summary.served_by == joining.keys.identity.node_id
        finally:
            await joining.stop(0)


async def test_a_next_hop_that_hangs_fails_the_set_up_within_the_relays_timeout(swarm: SwarmFactory) -> None:
    """The next hop accepts TCP but never answers (a hung process): the relay's set-up deadline
    covers sending the set-up cell too, so the client hears within it, not after TCP gives up."""
    import socket

    from services.relay.client import OpenCircuit
    from swarmserve.overlay import Peer
    from swarmserve.rpc import ServiceError

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # connections are queued by the kernel and never served
    try:
        async with swarm(relays=1, circuits=CircuitSettings(setup_timeout_s=1.0)) as s:
            relay = s.router.directory.alive(common_pb2.NODE_ROLE_RELAY)[0]
            address = f"127.0.0.1:{hung.getsockname()[1]}"
            descriptor = common_pb2.NodeDescriptor(address=address, onion_key=native.OnionKey.generate().public_key)
            silent = Peer("hung", descriptor, common_pb2.SignedDescriptor(), time.monotonic())
            started = time.monotonic()
            with pytest.raises(ServiceError) as error:
                await OpenCircuit.open(s.router.channels, [relay], silent, setup_timeout_s=10, cell_timeout_s=10)
            assert error.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() - started < 4.0
    finally:
        hung.close()
