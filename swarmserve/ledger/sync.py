"""Anti-entropy between ledger replicas: every interval, with one random live member, compare
chain heads, fetch what this replica lacks (checking every entry before accepting it) and push
what the peer lacks. A peer that serves entries breaking the rules is penalized: its refusals are
logged and it is not synced with again for ``PENALTY_S``."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import grpc
from grpc import aio

from swarmserve.ledger.replica import LedgerReplica
from swarmserve.ledger.servicer import MAX_FETCH
from swarmserve.overlay.directory import PeerDirectory
from swarmserve.rpc import ChannelPool
from swarmserve.telemetry import get_logger
from swarmserve.v1 import ledger_pb2, ledger_pb2_grpc

__all__ = ["PENALTY_S", "LedgerSync", "SyncResult"]

log = get_logger("swarmserve.ledger")

PENALTY_S = 300.0
_TIMEOUT_S = 5.0


@dataclass
class SyncResult:
    fetched: int = 0
    pushed: int = 0
    refused: list[str] = field(default_factory=list)


class LedgerSync:
    def __init__(
        self,
        replica: LedgerReplica,
        directory: PeerDirectory,
        channels: ChannelPool,
        interval_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self.replica = replica
        self._directory = directory
        self._channels = channels
        self._interval_s = interval_s
        self._rng = rng or random.SystemRandom()
        self.penalized: dict[str, float] = {}  # node id -> monotonic time the penalty ends
        self._task: asyncio.Task[None] | None = None

    async def sync_with(self, address: str, node_id: str = "") -> SyncResult:
        """One anti-entropy round with the replica at ``address``."""
        stub = ledger_pb2_grpc.LedgerStub(self._channels.get(address))
        result = SyncResult()
        theirs = (await stub.GetHeads(ledger_pb2.GetHeadsRequest(), timeout=_TIMEOUT_S)).heads
        ours = {head.author_key: head for head in await asyncio.to_thread(self.replica.heads)}
        for head in theirs:
            held = ours.get(head.author_key)
            next_sequence = (held.sequence if held else 0) + 1
            while next_sequence <= head.sequence:
                fetched = await stub.FetchEntries(
                    ledger_pb2.FetchEntriesRequest(
                        author_key=head.author_key, from_sequence=next_sequence, limit=MAX_FETCH
                    ),
                    timeout=_TIMEOUT_S,
                )
                if not fetched.entries:
                    break
                accepted = await asyncio.to_thread(self.replica.accept, fetched.entries)
                result.fetched += accepted.accepted
                result.refused.extend(accepted.rejected)
                if accepted.rejected or not accepted.accepted:
                    break  # a bad or stale chain: stop reading it
                next_sequence += len(fetched.entries)
        if result.refused:
            self._penalize(node_id or address, result.refused)
            return result
        # Push what they lack: every entry past their head (pull first, so ours is the union).
        their_heads = {head.author_key: head.sequence for head in theirs}
        missing: list[ledger_pb2.LedgerEntry] = []
        for head in await asyncio.to_thread(self.replica.heads):
            if head.sequence > their_heads.get(head.author_key, 0):
                missing.extend(
                    await asyncio.to_thread(
                        self.replica.fetch, head.author_key, their_heads.get(head.author_key, 0) + 1, 1024
                    )
                )
        if missing:
            try:
                pushed = await stub.PushEntries(ledger_pb2.PushEntriesRequest(entries=missing), timeout=_TIMEOUT_S)
                result.pushed = pushed.accepted
            except aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                result.refused.append(error.details() or "refused")
        return result

    def _penalize(self, who: str, refused: list[str]) -> None:
        self.penalized[who] = time.monotonic() + PENALTY_S
        log.warning("peer sent ledger entries that break the rules", peer=who, refused=refused[:3])

    async def round(self) -> SyncResult | None:
        now = time.monotonic()
        candidates = [
            peer
            for peer in self._directory.members()
            if peer.alive and self.penalized.get(peer.node_id, 0.0) <= now and peer.descriptor.address
        ]
        if not candidates:
            return None
        peer = self._rng.choice(candidates)
        return await self.sync_with(peer.descriptor.address, peer.node_id)

    def start(self) -> None:
        async def run() -> None:
            while True:
                await asyncio.sleep(self._interval_s * self._rng.uniform(0.5, 1.5))
                try:
                    await self.round()
                except (TimeoutError, aio.AioRpcError) as error:
                    log.debug("ledger sync failed", reason=str(error))

        self._task = asyncio.get_running_loop().create_task(run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
