"""Per-source limits on circuit set-ups: a token bucket of set-ups and a count of open circuits
for every source, so one source flooding a relay spends its own allowance and nobody else's.

A source is the address the previous hop connects from: an IPv4 address, or an IPv6 /64 (one
customer's usual allocation, so a flooder cannot rotate through its own 2^64 addresses). A
source that is the address of a swarm member (a relay passing on many users' circuits, a router)
gets ``member_factor`` times the allowance, as Tor exempts relays from its client limits; being a
member costs only a descriptor today, so the factor is bounded, not unlimited. Pure logic: the
relay's servicer calls :meth:`SourceLimits.admit` before it peels a set-up (junk costs tokens
too) and :meth:`SourceLimits.release` when the circuit ends.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from swarmserve.config import host_of as address_host
from swarmserve.rpc import ResourceExhausted
from swarmserve.rpc.limits import TokenBuckets

__all__ = ["SourceLimits", "host_of", "source_of"]


def host_of(peer: str) -> str:
    """The IP address in a gRPC peer string (empty for a unix socket)."""
    kind, _, rest = peer.partition(":")
    return address_host(rest) if kind in ("ipv4", "ipv6") else ""


def source_of(peer: str) -> str:
    """The source a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``) counts as."""
    kind = peer.partition(":")[0]
    if kind == "ipv4":
        return host_of(peer)
    if kind == "ipv6":
        host = host_of(peer)
        try:
            return str(ipaddress.IPv6Network(f"{host}/64", strict=False))
        except ValueError:
            return peer
    return kind  # unix sockets and anything else: one local source


class SourceLimits:
    def __init__(
        self,
        setups_per_s: float,
        setup_burst: int,
        circuits_per_source: int,
        member_factor: int = 16,
        max_sources: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._setups = TokenBuckets(setups_per_s, setup_burst, max_sources, clock)
        self._circuits = circuits_per_source
        self._member_factor = member_factor
        self._open: dict[str, int] = {}

    def admit(self, source: str, is_member: Callable[[], bool] = lambda: False) -> None:
        """Spends one set-up of ``source``'s allowance and counts a circuit open for it;
        raises ResourceExhausted (spending nothing) when either limit is reached.
        ``is_member`` is asked only when the source is first seen (it may be slow)."""
        most = int(self._circuits * self._setups.factor(source))
        if self._open.get(source, 0) >= most:
            raise ResourceExhausted(f"this source holds its maximum of {most} circuits on this relay")
        if not self._setups.take(
            source, lambda: self._member_factor if is_member() else 1, busy=lambda s: self._open.get(s, 0) > 0
        ):
            raise ResourceExhausted(
                "this source opens circuits faster than this relay allows (or the relay tracks its maximum of "
                "sources); slow down"
            )
        self._open[source] = self._open.get(source, 0) + 1

    def release(self, source: str) -> None:
        """The circuit :meth:`admit` counted for ``source`` has ended (or was refused)."""
        count = self._open.get(source, 0)
        if count > 1:
            self._open[source] = count - 1
        else:
            self._open.pop(source, None)

    def factor(self, source: str) -> float:
        """How many times the base allowance ``source`` gets (member_factor for a member's address)."""
        return self._setups.factor(source)

    def open_circuits(self, source: str) -> int:
        return self._open.get(source, 0)
