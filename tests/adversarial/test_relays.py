"""Issue 14, attack 4 (in part): a relay used as an open proxy. A set-up is a valid onion layer
for the relay's key (anyone can build one) naming any address as the next hop; the relay used to
dial it. Tried through the public Relay.Circuit of a real relay: a set-up naming a listener that
is no member of the swarm is refused as an unreachable hop and the listener sees no connection;
the control, a set-up naming a member, is passed on to it. Only the accepted set-up's replay tag
is remembered (a refused one must not fill the relay's replay cache)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpc import aio

from services.relay.circuit import create_cell
from swarmserve import native
from swarmserve.v1 import relay_pb2, relay_pb2_grpc
from tests.test_membership import Nodes, everyone_knows_everyone, nodes, until  # noqa: F401


async def set_up(relay_address: str, onion_key: bytes, next_hop: str) -> relay_pb2.RelayCell:
    onion, _ = native.Circuit.build([(onion_key, next_hop.encode()), (native.OnionKey.generate().public_key, b"")])
    async with aio.insecure_channel(relay_address) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Circuit()
        await call.write(create_cell(onion))
        reply: relay_pb2.RelayCell = await call.read()
        call.cancel()
        return reply


class Listener:
    """A TCP listener that counts the connections made to it (and closes them)."""

    def __init__(self) -> None:
        self.dialled = 0
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dialled += 1
        writer.close()


@asynccontextmanager
async def listening() -> AsyncIterator[Listener]:
    listener = Listener()
    server = await asyncio.start_server(listener._count, "127.0.0.1", listener.port)
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


async def test_a_relay_never_dials_a_non_member(nodes: Nodes) -> None:  # noqa: F811
    async with listening() as listener, nodes(2) as group:
        await until(lambda: everyone_knows_everyone(group), 5.0, "full membership")
        relay, member = group
        key = relay.onion_keys.public_key
        refused = await set_up(relay.address, key, f"127.0.0.1:{listener.port}")
        assert refused.WhichOneof("cell") == "destroy"
        assert refused.destroy.reason == relay_pb2.DESTROY_REASON_HOP_UNREACHABLE
        await asyncio.sleep(0.3)
        assert listener.dialled == 0, "the relay connected to an address no member publishes"
        assert relay.onion_keys.remembered == 0, "a refused set-up left its replay tag behind"
        # The control: a member as next hop is dialled (it refuses to terminate: a relay).
        passed = await set_up(relay.address, key, member.address)
        assert passed.WhichOneof("cell") == "destroy"
        assert passed.destroy.reason != relay_pb2.DESTROY_REASON_HOP_UNREACHABLE
        assert relay.onion_keys.remembered == 1
