"""Client channels to other nodes, one per address, with keepalive so that a peer that stops
answering (not just one that closes its connection) is noticed within seconds. The pool holds at
most ``max_channels``: the least recently used is closed (its calls get a grace period) when a
new address needs room, so peers that come and go (or addresses a liar names) cannot make a
node hold connections without end."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from grpc import aio

__all__ = ["KEEPALIVE_SERVER_OPTIONS", "STREAM_EOF", "ChannelPool", "open_stream"]

# grpc-stubs does not describe grpc.aio's read()/write() streaming API; these two names are the
# one place the project steps around that.
STREAM_EOF: Any = aio.EOF  # type: ignore[attr-defined]


def open_stream(method: Any) -> Any:
    """Starts a bidirectional call driven with ``write()``, ``read()`` and ``done_writing()``."""
    return method()


_CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A peer that died and came back is reached again within a second: gRPC's default backoff
    # (up to 120 s) would fail every call to it fast long after it returned.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
# Servers must accept those pings, or they answer GOAWAY "too many pings".
KEEPALIVE_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class ChannelPool:
    def __init__(
        self, max_message_bytes: int = 16 * 1024 * 1024, max_channels: int = 512, grace_s: float = 30.0
    ) -> None:
        self._options = [
            *_CLIENT_OPTIONS,
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._max_channels = max_channels
        self._grace_s = grace_s
        self._channels: OrderedDict[str, aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, address: str) -> aio.Channel:
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        while len(self._channels) >= self._max_channels:
            _, evicted = self._channels.popitem(last=False)
            task = asyncio.get_running_loop().create_task(evicted.close(self._grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        channel = aio.insecure_channel(address, options=self._options)
        self._channels[address] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        for task in list(self._closing):
            task.cancel()
