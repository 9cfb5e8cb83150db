"""The link data plane (``Relay.Link``, ``services/relay/links.py``) through real nodes and
sockets, attacked through its public interface.

Tried: a set-up on a link naming a non-member (refused as unreachable, nothing dialled, no replay
tag left); a set-up and its DESTROY in one frame (nothing held); a set-up sent back by a next hop
on the link the relay dialled to it (refused, nothing admitted); a malformed frame (that link ends with INVALID_ARGUMENT, the relay serves the next
one); 300 junk set-ups from one stranger in one frame (the first burst fails decryption, the rest
hit the source limit, each its own DESTROY, nothing admitted); and many streams at once through 3 hops, whose cells share frames (fewer frames than
cells at every relay) and whose tokens equal those of the Python data plane."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from grpc import aio

from services.inference.config import EmulatedSettings, ModelSettings, ProviderPolicy
from services.relay.client import circuit_opener
from services.relay.links import _Link
from services.router.config import CircuitPoolSettings
from swarmserve import native
from swarmserve.client import generate
from swarmserve.rpc import open_stream
from swarmserve.v1 import relay_pb2, relay_pb2_grpc
from tests.adversarial.test_relays import listening
from tests.conftest import SwarmFactory
from tests.test_membership import Nodes, everyone_knows_everyone, nodes, until  # noqa: F401

CREATE, DESTROY = 1, 4


def cell(circuit: int, kind: int, payload: bytes = b"", reason: int = 0) -> bytes:
    return circuit.to_bytes(4, "big") + bytes([kind, reason]) + len(payload).to_bytes(4, "big") + payload


def destroys(frame: bytes) -> list[tuple[int, int]]:
    """(circuit, reason) of each DESTROY cell of a frame."""
    found, at = [], 0
    while at < len(frame):
        length = int.from_bytes(frame[at + 6 : at + 10], "big")
        if frame[at + 4] == DESTROY:
            found.append((int.from_bytes(frame[at : at + 4], "big"), frame[at + 5]))
        at += 10 + length
    return found


async def read_destroys(call: object, count: int) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    while len(found) < count:
        found += destroys((await asyncio.wait_for(call.read(), 10)).cells)  # type: ignore[attr-defined]
    return found


async def test_a_link_setup_naming_a_non_member_is_refused_and_nothing_dialled(nodes: Nodes) -> None:  # noqa: F811
    async with listening() as listener, nodes(2) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        relay, member = group
        key = relay.onion_keys.public_key
        stranger = (native.OnionKey.generate().public_key, b"")
        to_stranger, _ = native.Circuit.build([(key, f"127.0.0.1:{listener.port}".encode()), stranger])
        to_member, _ = native.Circuit.build([(key, member.address.encode()), stranger])
        async with aio.insecure_channel(relay.address) as channel:
            link = open_stream(relay_pb2_grpc.RelayStub(channel).Link)
            await link.write(relay_pb2.LinkFrame(cells=cell(1, CREATE, to_stranger)))
            assert await read_destroys(link, 1) == [(1, relay_pb2.DESTROY_REASON_HOP_UNREACHABLE)]
            await asyncio.sleep(0.3)
            assert listener.dialled == 0, "the relay connected to an address no member publishes"
            assert relay.onion_keys.remembered == 0, "a refused set-up left its replay tag behind"
            # The control: a member as next hop is passed on over a link to it (the member, a
            # relay, cannot terminate it: its refusal comes back on the same circuit).
            await link.write(relay_pb2.LinkFrame(cells=cell(2, CREATE, to_member)))
            [(circuit, reason)] = await read_destroys(link, 1)
            assert circuit == 2 and reason == relay_pb2.DESTROY_REASON_PROTOCOL_ERROR
            assert relay.onion_keys.remembered == 1
            assert relay.relay.active == 0  # released when the member refused
            # A set-up withdrawn in its own frame (found by the fuzz: it was admitted, then could
            # not be passed on, and held its admission for good).
            withdrawn, _ = native.Circuit.build([(key, member.address.encode()), stranger])
            await link.write(relay_pb2.LinkFrame(cells=cell(3, CREATE, withdrawn) + cell(3, DESTROY, reason=1)))
            await asyncio.sleep(0.3)
            assert relay.relay.active == 0 and relay.relay.links.engine.circuits == 0
            link.cancel()


async def test_a_setup_sent_back_on_a_link_the_relay_dialled_is_refused(nodes: Nodes) -> None:  # noqa: F811
    async with nodes(3) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        relay, next_hop, third = group
        stranger = (native.OnionKey.generate().public_key, b"")
        onion, _ = native.Circuit.build([(relay.onion_keys.public_key, next_hop.address.encode()), stranger])
        async with aio.insecure_channel(relay.address) as channel:
            link = open_stream(relay_pb2_grpc.RelayStub(channel).Link)
            await link.write(relay_pb2.LinkFrame(cells=cell(1, CREATE, onion)))
            await read_destroys(link, 1)  # the relay dialled a link to next_hop, which refused
            remembered = relay.onion_keys.remembered
            # next_hop turns hostile: a set-up of its own, back over the link the relay dialled,
            # through the relay to a third member.
            plane = next_hop.relay.links
            [accepted] = list(plane._links)
            back = [(relay.onion_keys.public_key, third.address.encode()), (third.onion_keys.public_key, b"")]
            plane.engine.originate(accepted, back, 99)
            plane._after()
            await asyncio.sleep(0.5)
            assert relay.onion_keys.remembered == remembered, "the relay admitted a set-up from its next hop"
            assert plane.engine.circuits == 0  # refused (PROTOCOL_ERROR) back to its sender
            link.cancel()


async def test_malformed_frames_end_their_link_and_junk_setups_meet_the_source_limit(nodes: Nodes) -> None:  # noqa: F811
    async with nodes(1) as [relay], aio.insecure_channel(relay.address) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)
        bad = open_stream(stub.Link)
        await bad.write(relay_pb2.LinkFrame(cells=b"\x00\x00\x00\x01\x09"))  # truncated, unknown kind
        with pytest.raises(aio.AioRpcError) as error:
            await asyncio.wait_for(bad.read(), 10)
        assert error.value.code().name == "INVALID_ARGUMENT"
        assert "malformed link frame" in (error.value.details() or "")

        link = open_stream(stub.Link)
        junk = b"".join(cell(i, CREATE, bytes(native.SETUP_CELL_SIZE)) for i in range(1, 301))
        await link.write(relay_pb2.LinkFrame(cells=junk))
        reasons = Counter(reason for _, reason in await read_destroys(link, 300))
        burst = relay.config.circuits.setup_burst_per_source
        assert reasons[relay_pb2.DESTROY_REASON_PROTOCOL_ERROR] in range(burst, burst + 5)  # undecryptable
        assert (
            reasons[relay_pb2.DESTROY_REASON_RESOURCE_LIMIT] == 300 - reasons[relay_pb2.DESTROY_REASON_PROTOCOL_ERROR]
        )
        assert relay.relay.active == 0 and relay.relay.links.engine.circuits == 0
        link.cancel()


EMULATED = ModelSettings(name="emulated-links", engine="emulated", emulated=EmulatedSettings(batch_slowdown=0))


async def test_many_streams_share_frames_and_match_the_python_plane(swarm: SwarmFactory) -> None:
    node = {"models": [EMULATED], "policy": ProviderPolicy(max_concurrent=64, max_queue=64)}
    no_pool = CircuitPoolSettings(enabled=False)  # every circuit built on the plane being compared
    async with swarm(inference=[node], circuit_pool=no_pool) as s:
        prompts = [f"stream {i} of many" for i in range(24)]
        service = s.router.service

        async def answer(prompt: str) -> list[int]:
            result = await generate(s.router.address, prompt, model=EMULATED.name, hops=3, max_tokens=24)
            return result.token_ids

        linked = await asyncio.gather(*(answer(p) for p in prompts))
        assert all(len(ids) == 24 for ids in linked)
        for relay in s.relays:
            frames = relay.relay.links.frames["received"]
            cells = sum(relay.relay.links.engine.forwarded[:2])
            assert 0 < frames < cells, f"cells were not batched: {frames} frames for {cells} cells"
        service.open_circuit = circuit_opener("circuit-rpc", service.channels, service.links)
        frames = sum(relay.relay.links.frames["received"] for relay in s.relays)
        python = [await answer(p) for p in prompts[:4]]
        assert python == linked[:4]
        assert sum(relay.relay.links.frames["received"] for relay in s.relays) == frames  # not on the links


async def test_a_link_says_when_its_writer_caught_up_so_a_terminus_can_hold_and_join_tokens() -> None:
    """What the terminus waits on before taking its next answer (``CircuitEnd.writable``): an
    idle link answers at once; a link with a write in flight answers when that write is done
    (the writer asks for the next batch), not before; a lost link frees its waiters."""
    link = _Link(1, "peer", dialled=False)
    await asyncio.wait_for(link.written(), 0.1)  # nothing waiting: the token goes at once
    link.queue(b"frame")
    writer = link.outgoing()
    assert await anext(writer) == b"frame"  # taken, being written
    waiting = asyncio.create_task(link.written())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a backlogged link holds the terminus"
    next_batch = asyncio.create_task(anext(writer))  # the write finished
    await asyncio.wait_for(waiting, 1)
    link.queue(b"another")
    assert await next_batch == b"another"
    stranded = asyncio.create_task(link.written())
    await asyncio.sleep(0.01)
    link.end()
    await asyncio.wait_for(stranded, 1)
    await writer.aclose()
