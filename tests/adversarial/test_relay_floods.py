"""Issue 14, attack 4: denying service to relays. Tried through the public Relay.Circuit of
real relays:

- A flood of set-ups from one source (an attacker connecting from 127.0.0.2, through a TCP
  forwarder bound to that address): random junk, valid onions asking the relay to terminate
  (it only forwards), and valid onions through the relay to a member with a junk last hop (the
  relay accepts those). Before, every one that peeled left its replay tag behind, the cache
  (50 here) filled, and every later circuit was refused for the tags' lifetime. Now the source
  spends only its own allowance, refused set-ups leave no tag, and a router's circuit through the
  same relay during and after the flood is answered.
- A set-up recorded and replayed after the relay restarts. Before, the onion key was on disk and
  the replay cache in memory, so the replay was accepted and forwarded again. Now onion keys live
  only in memory: the restarted relay (same identity, same address) cannot open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.relay.circuit import create_cell
from services.relay.config import CircuitSettings, RelayConfig
from services.relay.node import RelayNode
from swarmserve import native
from swarmserve.client import generate
from swarmserve.config import ServerSettings
from swarmserve.v1 import relay_pb2_grpc
from tests.conftest import FAST_GOSSIP, MODEL, SwarmFactory, joining
from tests.test_membership import everyone_knows_everyone, until

ATTACKER_SOURCE = "127.0.0.2"


@contextlib.asynccontextmanager
async def from_source(target: str, source: str) -> AsyncIterator[str]:
    """A TCP forwarder: what connects to the address it yields reaches ``target`` from
    ``source`` (a loopback address of its own, so the relay sees another source)."""
    host, port = target.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def attempt(channel: aio.Channel, onion: bytes) -> str:
    """Sends one set-up; what came back: a cell kind, or a status code's name."""
    call = relay_pb2_grpc.RelayStub(channel).Circuit()
    try:
        await call.write(create_cell(onion))
        reply = await call.read()
        return "eof" if reply is aio.EOF else str(reply.WhichOneof("cell"))
    except aio.AioRpcError as error:
        return error.code().name
    finally:
        call.cancel()


def loopback_alias_works() -> bool:
    with socket.socket() as s:
        try:
            s.bind((ATTACKER_SOURCE, 0))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not loopback_alias_works(), reason=f"cannot bind {ATTACKER_SOURCE} (no 127/8 loopback)")
async def test_junk_setups_from_one_source_do_not_stop_a_legitimate_circuit(swarm: SwarmFactory) -> None:
    limits = CircuitSettings(replay_cache_capacity=50, setups_per_source_per_s=0.5, setup_burst_per_source=20)
    async with swarm(relays=1, circuits=limits) as s:
        relay, exit_ = s.relays[0], s.inference[0]
        key = relay.onion_keys.public_key

        def junk(i: int) -> bytes:
            if i % 3 == 0:
                return os.urandom(native.SETUP_CELL_SIZE)  # no set-up at all
            if i % 3 == 1:
                return native.Circuit.build([(key, b"")])[0]  # asks a relay to terminate: refused
            last_hop = native.OnionKey.generate().public_key  # the relay accepts and forwards these
            return native.Circuit.build([(key, exit_.address.encode()), (last_hop, b"")])[0]

        async with (
            from_source(relay.address, ATTACKER_SOURCE) as attacker_door,
            aio.insecure_channel(attacker_door) as attacker,
        ):
            onions = [junk(i) for i in range(300)]
            flood = asyncio.gather(*(attempt(attacker, onion) for onion in onions))
            during = await generate(s.router.address, "Hello", model=MODEL, hops=1, max_tokens=4)
            outcomes = await flood
        after = await generate(s.router.address, "Hello again", model=MODEL, hops=1, max_tokens=4)
        assert during.token_ids and after.token_ids
        assert during.summary is not None and during.summary.hops == 1
        refused_for_rate = outcomes.count("RESOURCE_EXHAUSTED")
        assert refused_for_rate >= 250, f"the source was not limited: { {o: outcomes.count(o) for o in set(outcomes)} }"
        # Accepted set-ups are at most the source's burst and what its rate refilled; nothing
        # refused was remembered, so the 50-tag cache never filled and the key never changed.
        assert relay.onion_keys.remembered <= 20 + 2 + 2  # the flood's, plus the router's two circuits
        assert relay.onion_keys.public_key == key
        # The router (a member's address) got the member allowance; the attacker the base one.
        assert relay.relay.sources.factor("127.0.0.1") == 16 and relay.relay.sources.factor(ATTACKER_SOURCE) == 1


async def test_a_setup_replayed_after_a_relay_restart_is_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def relay_config(seeds: list[RelayNode]) -> RelayConfig:
        return RelayConfig(
            data_dir=tmp_path / "relay",
            server=ServerSettings(listen=f"127.0.0.1:{port}"),
            gossip=joining(seeds, FAST_GOSSIP),
        )

    relay = RelayNode(relay_config([]))
    await relay.start()
    member = RelayNode(
        RelayConfig(
            data_dir=tmp_path / "member",
            server=ServerSettings(listen="127.0.0.1:0"),
            gossip=joining([relay], FAST_GOSSIP),
        )
    )
    await member.start()
    restarted: RelayNode | None = None
    try:
        await until(lambda: everyone_knows_everyone([relay, member]), 5.0, "membership")
        # A set-up through the relay to the member (whose own layer is junk): the relay accepts
        # it and forwards it; the member refuses it. An eavesdropper records the cell.
        recorded = native.Circuit.build(
            [(relay.onion_keys.public_key, member.address.encode()), (native.OnionKey.generate().public_key, b"")]
        )[0]
        async with aio.insecure_channel(relay.address) as channel:
            assert await attempt(channel, recorded) == "destroy"  # forwarded, refused further on
            assert await attempt(channel, recorded) == grpc.StatusCode.ALREADY_EXISTS.name
        identity = relay.keys.identity.node_id
        await relay.stop(0)
        restarted = RelayNode(relay_config([member]))
        await restarted.start()
        assert restarted.keys.identity.node_id == identity and restarted.address == f"127.0.0.1:{port}"
        await until(lambda: everyone_knows_everyone([restarted, member]), 5.0, "membership after the restart")
        async with aio.insecure_channel(restarted.address) as channel:
            assert await attempt(channel, recorded) == grpc.StatusCode.INVALID_ARGUMENT.name
            assert restarted.onion_keys.remembered == 0
            # The control: a set-up built from the restarted relay's new descriptor is forwarded.
            fresh = native.Circuit.build(
                [
                    (restarted.onion_keys.public_key, member.address.encode()),
                    (native.OnionKey.generate().public_key, b""),
                ]
            )[0]
            assert await attempt(channel, fresh) == "destroy"
            assert restarted.onion_keys.remembered == 1
    finally:
        for node in (restarted, member):
            if node is not None:
                await node.stop(0)
        if restarted is None:
            await relay.stop(0)
