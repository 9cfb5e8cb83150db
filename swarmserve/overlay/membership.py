"""Membership by gossip: SWIM (Das, Gupta, Motivala 2002) as memberlist runs it, over gRPC, with
signed descriptors as the members' own statements about themselves.

Every protocol period (``probe_interval_s``, T) a node probes one member, taken in a shuffled
round-robin order so that every member is probed by every node at least once per n periods.
A probe that is not acknowledged within ``probe_timeout_s`` is retried indirectly through
``indirect_probes`` other members; if none of them reaches it by the end of the period, the member
is suspected, and declared dead after the suspicion timeout (``suspicion_mult`` x max(1, log10 n)
periods) unless a newer descriptor of it arrives first: every packet a member sends carries its
own freshly signed descriptor, so any contact refutes a false suspicion, and nobody can refute
for it. Only a member ends its own membership at once (a signed leave); anyone else's SUSPECT
or DEAD claim, about its current incarnation only, makes it at most suspect here, and this
node's own suspicion timer decides: a liar cannot remove a live node, whose next packet
refutes, nor push its incarnation anywhere (claims about other incarnations are ignored).
News (alive with the descriptor, suspect, dead) rides on probes and their answers, at most
``max_piggyback`` pieces per packet, each sent ``retransmit_mult`` x ceil(log10(n+1)) times, least
sent first. So a node sends one probe per period (plus ``indirect_probes`` when one fails) of
bounded size, however large the swarm. A joining node needs one seed that answers: a push-pull
``Exchange`` with it fills its directory; the same exchange with one random member every
``sync_interval_s`` repairs anything gossip missed.

Bound on noticing a failure: a member that stops answering is probed by some node within n x T
at worst (about T on average, since n nodes each probe one member per period), suspected by the
end of that period, declared dead after the suspicion timeout, and the news reaches everyone in
O(log n) further periods.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass

from grpc import aio

from swarmserve import native
from swarmserve.config import GossipSettings
from swarmserve.overlay.descriptors import DescriptorError
from swarmserve.overlay.directory import ALIVE, DEAD, SUSPECT, Peer, PeerDirectory
from swarmserve.overlay.publisher import DescriptorPublisher, leave_message
from swarmserve.rpc.channels import ChannelPool
from swarmserve.rpc.errors import ResourceExhausted, Unavailable
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc

__all__ = ["Membership"]

log = get_logger("swarmserve.overlay")


# What one sender may push at once: honest packets carry at most max_piggyback pieces of news and
# honest exchanges push only the sender's own descriptor, so a flood is refused before any
# signature is checked (each costs the receiver a verification on its event loop).
MAX_PUSHED = 64


def _bounded(count: int, what: str) -> None:
    if count > MAX_PUSHED:
        raise ResourceExhausted(f"{count} {what}; at most {MAX_PUSHED}")


def _signed_leave(update: overlay_pb2.MemberUpdate) -> bool:
    try:
        native.verify_signature(
            update.identity_key, leave_message(update.identity_key, update.incarnation), update.leave_signature
        )
    except (native.SignatureError, native.InvalidKeyError, ValueError, OverflowError):
        return False
    return True


@dataclass
class _News:
    update: overlay_pb2.MemberUpdate
    sent: int = 0


class Membership:
    def __init__(
        self,
        publisher: DescriptorPublisher,
        channels: ChannelPool,
        settings: GossipSettings,
        directory: PeerDirectory | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.publisher = publisher
        self.describe = publisher.describe
        self.own_key = publisher.identity_key
        self.directory = directory or PeerDirectory(self.own_key)
        self.settings = settings
        self._channels = channels
        self._rng = rng or random.SystemRandom()
        self._news: dict[bytes, _News] = {}  # newest news per member (identity key)
        self._order: list[str] = []  # probe order for this pass over the members
        self._task: asyncio.Task[None] | None = None
        self.packets_sent = 0  # probes, indirect probe requests and exchanges sent (for benchmarks)
        self._left = False

    # --- what arrives ------------------------------------------------------------------------

    async def on_swim(self, packet: overlay_pb2.SwimPacket) -> overlay_pb2.SwimPacket:
        """Answers a probe (the answer is the acknowledgement) or an indirect probe request."""
        if self._left:  # answering would carry a fresh descriptor and undo the goodbye
            raise Unavailable("this node has left the swarm")
        _bounded(len(packet.updates), "updates in one packet")
        sender = self._absorb(packet)
        acked = False
        if packet.probe_target:
            target = self.directory.get(native.node_id(packet.probe_target)) if len(packet.probe_target) == 32 else None
            if target is not None:
                acked = await self._ping(target, self.settings.probe_timeout_s)
        answer = self._packet(probe_acked=acked)
        # A member we hold suspect or dead that talks to us (back from a partition, say) is told
        # so directly: the news may have stopped circulating long ago, and it must refute.
        if sender is not None and not sender.alive:
            answer.updates.append(self._claim_news(sender))
        return answer

    def on_exchange(self, request: overlay_pb2.ExchangeRequest) -> overlay_pb2.ExchangeResponse:
        if self._left:
            raise Unavailable("this node has left the swarm")
        _bounded(len(request.updates), "descriptors pushed in one exchange")
        for signed in [request.sender, *request.updates]:
            if signed.descriptor:
                self._learn(signed)
        known = {(d.identity_key, d.version) for d in request.known}
        updates = [self.describe()] + [
            p.signed for p in self.directory.members() if (p.descriptor.identity_key, p.descriptor.version) not in known
        ]
        return overlay_pb2.ExchangeResponse(updates=updates)

    def _absorb(self, packet: overlay_pb2.SwimPacket) -> Peer | None:
        """Takes in a packet's news; returns its sender, if its descriptor was new to us."""
        sender = self._learn(packet.sender) if packet.sender.descriptor else None
        for update in packet.updates:
            if update.state == ALIVE:
                if update.descriptor.descriptor:
                    self._learn(update.descriptor)
            elif update.state in (SUSPECT, DEAD):
                # Only the member's own signed goodbye makes it dead at once; anyone else's death
                # claim is a suspicion, which this node's own timer decides.
                left = update.state == DEAD and _signed_leave(update)
                self._claim(update.identity_key, DEAD if left else SUSPECT, update.incarnation, update.leave_signature)
        return sender

    def _learn(self, signed: common_pb2.SignedDescriptor) -> Peer | None:
        peer = self.directory.offer(signed)
        if peer is not None:
            if peer.alive:  # a newer descriptor of a member still suspect or dead is no news
                update = overlay_pb2.MemberUpdate(
                    identity_key=peer.descriptor.identity_key,
                    state=ALIVE,
                    incarnation=peer.descriptor.incarnation,
                    descriptor=signed,
                )
                self._enqueue(update)
            if peer.node_id not in self._order:  # new members join the current pass at a random place
                self._order.insert(self._rng.randint(0, len(self._order)), peer.node_id)
        return peer

    def _claim(
        self, key: bytes, state: overlay_pb2.MemberState.ValueType, incarnation: int, leave_signature: bytes = b""
    ) -> None:
        if key == self.own_key:
            if self._left or incarnation != self.publisher.incarnation:
                return  # a claim about a past (or a made-up future) incarnation needs no answer
            # Refute: only this node can sign a descriptor with a higher incarnation.
            self.publisher.refute()
            signed = self.describe()
            self._enqueue(
                overlay_pb2.MemberUpdate(
                    identity_key=key, state=ALIVE, incarnation=self.publisher.incarnation, descriptor=signed
                )
            )
            log.info("refuting a claim about this node", claimed=overlay_pb2.MemberState.Name(state))
            return
        if len(key) != 32:
            return
        peer = self.directory.set_state(native.node_id(key), state, incarnation, leave_signature)
        if peer is not None:
            self._enqueue(self._claim_news(peer))

    @staticmethod
    def _claim_news(peer: Peer) -> overlay_pb2.MemberUpdate:
        return overlay_pb2.MemberUpdate(
            identity_key=peer.descriptor.identity_key,
            state=peer.state,
            incarnation=peer.claimed_incarnation,
            leave_signature=peer.leave_signature,
        )

    def _enqueue(self, update: overlay_pb2.MemberUpdate) -> None:
        self._news[update.identity_key] = _News(update)

    # --- what goes out -------------------------------------------------------------------------

    def _retransmit_limit(self) -> int:
        return self.settings.retransmit_mult * math.ceil(math.log10(len(self.directory.members()) + 2))

    def _packet(self, probe_target: bytes = b"", probe_acked: bool = False) -> overlay_pb2.SwimPacket:
        news = sorted(self._news.values(), key=lambda n: n.sent)[: self.settings.max_piggyback]
        limit = self._retransmit_limit()
        for item in news:
            item.sent += 1
            if item.sent >= limit:
                del self._news[item.update.identity_key]
        return overlay_pb2.SwimPacket(
            sender=self.describe(),
            updates=[n.update for n in news],
            probe_target=probe_target,
            probe_acked=probe_acked,
        )

    async def _send(self, peer: Peer, packet: overlay_pb2.SwimPacket, timeout: float) -> overlay_pb2.SwimPacket | None:
        self.packets_sent += 1
        stub = overlay_pb2_grpc.OverlayStub(self._channels.get(peer.descriptor.address))
        try:
            answer: overlay_pb2.SwimPacket = await stub.Swim(packet, timeout=timeout)
        except aio.AioRpcError:
            return None
        self._absorb(answer)
        return answer

    async def _ping(self, peer: Peer, timeout: float) -> bool:
        return await self._send(peer, self._packet(), timeout) is not None

    async def _ping_via(self, helper: Peer, target: Peer, timeout: float) -> bool:
        answer = await self._send(helper, self._packet(probe_target=target.descriptor.identity_key), timeout)
        return answer is not None and answer.probe_acked

    # --- the protocol period -------------------------------------------------------------------

    def _next_target(self) -> Peer | None:
        for _ in range(2):
            while self._order:
                peer = self.directory.get(self._order.pop())
                if peer is not None and peer.state != DEAD:
                    return peer
            self._order = [p.node_id for p in self.directory.members()]
            self._rng.shuffle(self._order)
        return None

    async def probe_round(self) -> None:
        """One protocol period's probe: direct, then indirect, then suspicion."""
        target = self._next_target()
        if target is None:
            return
        period, timeout = self.settings.probe_interval_s, self.settings.probe_timeout_s
        if await self._ping(target, timeout):
            return
        helpers = [p for p in self.directory.members() if p.alive and p.node_id != target.node_id]
        helpers = self._rng.sample(helpers, min(self.settings.indirect_probes, len(helpers)))
        if helpers:
            answers = await asyncio.gather(*(self._ping_via(h, target, period - timeout) for h in helpers))
            if any(answers):
                return
        self.suspect(target.node_id)

    def suspect(self, node_id: str) -> None:
        """Starts the suspicion of a member (also used by callers whose requests to it failed);
        it is declared dead unless it refutes within the suspicion timeout."""
        peer = self.directory.get(node_id)
        if peer is not None and peer.alive:
            self._claim(peer.descriptor.identity_key, SUSPECT, peer.descriptor.incarnation)

    def suspicion_timeout_s(self) -> float:
        members = max(len(self.directory.members()), 1)
        return self.settings.suspicion_mult * max(1.0, math.log10(members)) * self.settings.probe_interval_s

    def expire(self, now: float | None = None) -> None:
        """Declares dead the suspects whose suspicion timed out; forgets long-dead members."""
        now = time.monotonic() if now is None else now
        timeout = self.suspicion_timeout_s()
        for peer in self.directory.peers():
            if peer.state == SUSPECT and now - peer.state_since >= timeout:
                self._claim(peer.descriptor.identity_key, DEAD, peer.claimed_incarnation)
            elif peer.state == DEAD and now - peer.state_since >= self.settings.dead_retention_s:
                self.directory.forget(peer.node_id)

    # --- joining, repair, leaving --------------------------------------------------------------

    async def exchange(self, address: str) -> bool:
        """Push-pull with one member: both end up with the newer of each other's descriptors."""
        self.packets_sent += 1
        request = overlay_pb2.ExchangeRequest(
            sender=self.describe(),
            known=[
                overlay_pb2.DescriptorDigest(identity_key=p.descriptor.identity_key, version=p.descriptor.version)
                for p in self.directory.members()
            ],
        )
        stub = overlay_pb2_grpc.OverlayStub(self._channels.get(address))
        try:
            reply = await stub.Exchange(request, timeout=max(self.settings.probe_interval_s, 1.0))
        except aio.AioRpcError:
            return False
        for signed in reply.updates:
            self._learn(signed)
        return True

    async def join(self) -> int:
        """Exchanges with every seed at once; returns how many answered."""
        answers = await asyncio.gather(*(self.exchange(seed) for seed in self.settings.seeds))
        return sum(answers)

    async def sync(self) -> None:
        members = [p for p in self.directory.members() if p.alive]
        if members:
            await self.exchange(self._rng.choice(members).descriptor.address)
        elif self.settings.seeds:
            await self.join()  # knows nobody alive (yet, or any more): back to the seeds

    async def leave(self) -> None:
        """Tells a few members this node is leaving, so they need not wait for the suspicion;
        from then on it answers no gossip (until :meth:`start` rejoins)."""
        self._left = True
        update = overlay_pb2.MemberUpdate(
            identity_key=self.own_key,
            state=DEAD,
            incarnation=self.publisher.incarnation,
            leave_signature=self.publisher.leave_signature(),
        )
        packet = overlay_pb2.SwimPacket(updates=[update])
        members = [p for p in self.directory.members() if p.alive]
        targets = self._rng.sample(members, min(self.settings.indirect_probes + 1, len(members)))
        await asyncio.gather(*(self._send(p, packet, self.settings.probe_timeout_s) for p in targets))

    def start(self) -> None:
        if self._left:  # rejoining: a new incarnation outranks the goodbye
            self._left = False
            self.publisher.refute()

        async def run() -> None:
            next_sync = time.monotonic() + self.settings.sync_interval_s
            while True:
                started = time.monotonic()
                try:
                    await self.probe_round()
                    self.expire()
                    if started >= next_sync:
                        next_sync = started + self.settings.sync_interval_s
                        await self.sync()
                except (DescriptorError, ValueError) as error:  # a bad peer must not stop gossip
                    log.warning("gossip round failed", reason=str(error))
                await asyncio.sleep(max(0.0, self.settings.probe_interval_s - (time.monotonic() - started)))

        self._task = asyncio.get_running_loop().create_task(run())

    async def close(self, leave: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if leave:
                with contextlib.suppress(aio.AioRpcError, asyncio.TimeoutError):
                    await self.leave()
