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
Every message is signed by its sender and every suspicion by its claimant (``packets.py``,
checked off the event loop); a sender gets ``sender_packets_per_s`` messages a second. A
suspicion lasts up to ``suspicion_max_mult`` times the timeout below and shortens with each
independent confirmation (Lifeguard, ``suspicion.py``), so one member that cannot reach another
cannot get it declared dead fast.
News (alive with the descriptor, suspect, dead) rides on probes and their answers, at most
``max_piggyback`` pieces per packet, each sent ``retransmit_mult`` x ceil(log10(n+1)) times, least
sent first. So a node sends one probe per period (plus ``indirect_probes`` when one fails) of
bounded size, however large the swarm. A joining node needs one seed that answers: a push-pull
``Exchange`` with it fills its directory; the same exchange with one random member every
``sync_interval_s`` repairs anything gossip missed, and one with a member declared dead (until it
is forgotten) lets a node that came back rejoin though it knows nobody (a restarted seed).

Lifeguard's local health (``awareness.py``): a node that shows signs of being the slow one (its
probe and every helper's answer went missing, it had to refute a suspicion about itself, its
event loop ran late: ``looplag.py``) multiplies its probe timeout, its protocol period and the
suspicion timeouts it applies by up to ``awareness_max_multiplier``; each probe answered in time
brings the multiplier down by one. So a busy node neither accuses live members it is too slow to
hear nor hurries their deaths. A member found SUSPECT is told so in the probe itself (Lifeguard's
buddy system), so a busy but live member hears it at once and refutes; it sends the refutation at
once to the claimant and a few others, not with its next (stretched) period's probe. A caller's
failed request (:meth:`Membership.suspect`) makes a healthy node suspect the member; one whose
health is degraded probes it first, out of turn, and suspects it only if that probe fails.

Bound on noticing a failure: a member that stops answering is probed by some node within n x T
at worst (about T on average, since n nodes each probe one member per period), suspected by the
end of that period, declared dead after the suspicion timeout, and the news reaches everyone in
O(log n) further periods. Each of T and the suspicion timeout is stretched by the prober's health
multiplier, so the bound is up to ``awareness_max_multiplier`` times longer on nodes that are
themselves slow.
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
from swarmserve.overlay.awareness import Awareness
from swarmserve.overlay.descriptors import DescriptorError, node_id_of
from swarmserve.overlay.directory import ALIVE, DEAD, SUSPECT, Peer, PeerDirectory
from swarmserve.overlay.looplag import LoopLag
from swarmserve.overlay.packets import Message, OpenedMessage, PacketError, open_message
from swarmserve.overlay.publisher import DescriptorPublisher
from swarmserve.overlay.suspicion import Suspicion, expected_confirmations
from swarmserve.rpc.channels import ChannelPool
from swarmserve.rpc.errors import ResourceExhausted, Unauthenticated, Unavailable
from swarmserve.rpc.limits import TokenBuckets
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc

__all__ = ["Membership"]

log = get_logger("swarmserve.overlay")


# What one sender may push at once: honest packets carry at most max_piggyback pieces of news and
# honest exchanges push only the sender's own descriptor, so a flood is refused before any
# signature is checked (each costs the receiver a signature verification).
MAX_PUSHED = 64
# What one exchange may list or answer: a whole swarm's descriptors (PlanetServe's 10,000 with
# room to spare), no more.
MAX_EXCHANGED = 16_384


def _bounded(count: int, what: str, most: int = MAX_PUSHED) -> None:
    if count > most:
        raise ResourceExhausted(f"{count} {what}; at most {most}")


@dataclass
class _News:
    update: overlay_pb2.MemberUpdate
    sent: int = 0


@dataclass
class GossipCounters:
    """What this node's gossip cost and found, since it started (read by ``/metrics``)."""

    probes: int = 0  # protocol periods that probed a member (and probes out of turn)
    probe_failures: int = 0  # of which neither the direct nor an indirect probe was answered
    health_score: int = 0  # Lifeguard's local health now: 0 healthy, timeouts x (score + 1)
    late_loop: int = 0  # times the event loop was found late (each raised health_score)
    worst_loop_lag_s: float = 0.0  # the largest event-loop lag measured
    refutations: int = 0  # suspicions about this node it refuted (each raised health_score)
    messages_sent: int = 0  # Swim and Exchange messages, requests and answers
    bytes_sent: int = 0
    bytes_received: int = 0

    def sent(self, message: Message) -> None:
        self.messages_sent += 1
        self.bytes_sent += message.ByteSize()

    def received(self, message: Message) -> None:
        self.bytes_received += message.ByteSize()


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
        self._suspicions: dict[str, Suspicion] = {}  # per suspect member (node id)
        self._senders = TokenBuckets(settings.sender_packets_per_s, settings.sender_burst)
        self._order: list[str] = []  # probe order for this pass over the members
        self._task: asyncio.Task[None] | None = None
        self._checks: dict[str, asyncio.Task[None]] = {}  # out-of-turn probes, per member (node id)
        self._pushing: asyncio.Task[None] | None = None  # a refutation being pushed
        self.counters = GossipCounters()
        self._left = False
        self.awareness = Awareness(settings.awareness_max_multiplier)
        self._lag = LoopLag(
            settings.probe_timeout_s, settings.awareness_lag_fraction * settings.probe_timeout_s, self._on_late
        )

    # --- local health (Lifeguard) --------------------------------------------------------------

    def _health(self, delta: int, reason: str) -> None:
        """Moves the local health score; a rise also stretches the suspicions running now, so
        each lasts as long as the slowest this node was while it ran (``Suspicion.stretch``)."""
        was = self.awareness.score
        if self.awareness.apply(delta) == 0:
            return
        score = self.counters.health_score = self.awareness.score
        if score > was:
            for suspicion in self._suspicions.values():
                suspicion.stretch(self.awareness.multiplier)
        if was == 0 or score == 0:  # only the turns, so a busy node does not log at every tick
            log.info(
                "local health " + ("degraded" if score else "restored"),
                score=score,
                reason=reason,
                worst_loop_lag_s=round(self.counters.worst_loop_lag_s, 3),
            )

    def _on_late(self, lag_s: float) -> None:
        """The event loop ran ``lag_s`` late: as many probe timeouts behind, as many points."""
        self.counters.late_loop += 1
        self.counters.worst_loop_lag_s = max(self.counters.worst_loop_lag_s, lag_s)
        self._health(math.ceil(lag_s / self.settings.probe_timeout_s), "event loop late")

    def probe_timeout_s(self) -> float:
        """How long a direct probe waits now: probe_timeout_s x the health multiplier."""
        return self.awareness.scale(self.settings.probe_timeout_s)

    def probe_interval_s(self) -> float:
        """The protocol period now: probe_interval_s x the health multiplier."""
        return self.awareness.scale(self.settings.probe_interval_s)

    # --- what arrives ------------------------------------------------------------------------

    async def _open(self, message: Message) -> OpenedMessage:
        """Every signature in ``message`` checked off the event loop; raises Unauthenticated."""
        try:
            return await asyncio.to_thread(open_message, message)
        except PacketError as error:
            raise Unauthenticated(str(error)) from None

    def _admit(self, sender: common_pb2.NodeDescriptor) -> None:
        if not self._senders.take(node_id_of(sender)):
            raise ResourceExhausted("this sender gossips faster than this node allows; slow down")

    async def on_swim(
        self, packet: overlay_pb2.SwimPacket, time_remaining_s: float | None = None
    ) -> overlay_pb2.SwimPacket:
        """Answers a probe (the answer is the acknowledgement) or an indirect probe request.
        ``time_remaining_s``: the caller's deadline; a helper's probe ends before it, so that the
        caller hears "not reached" (a nack) rather than nothing, which would count against its
        own health."""
        if self._left:  # answering would carry a fresh descriptor and undo the goodbye
            raise Unavailable("this node has left the swarm")
        _bounded(len(packet.updates), "updates in one packet")
        self.counters.received(packet)
        opened = await self._open(packet)
        self._admit(opened.sender)
        sender = self._absorb(opened)
        acked = False
        if packet.probe_target:
            target = self.directory.get(native.node_id(packet.probe_target)) if len(packet.probe_target) == 32 else None
            if target is not None:
                timeout = self.probe_timeout_s()
                if time_remaining_s is not None:
                    timeout = min(timeout, 0.8 * time_remaining_s)  # the rest carries the answer back
                acked = await self._ping(target, timeout)
        answer = self._packet(probe_acked=acked)
        # A member we hold suspect or dead that talks to us (back from a partition, say) is told
        # so directly: the news may have stopped circulating long ago, and it must refute.
        if sender is not None and not sender.alive:
            answer.updates.append(
                self.publisher.claim(sender.descriptor.identity_key, SUSPECT, sender.claimed_incarnation)
            )
        signed = self.publisher.sign(answer)
        self.counters.sent(signed)
        return signed

    async def on_exchange(self, request: overlay_pb2.ExchangeRequest) -> overlay_pb2.ExchangeResponse:
        if self._left:
            raise Unavailable("this node has left the swarm")
        _bounded(len(request.updates), "descriptors pushed in one exchange")
        _bounded(len(request.known), "digests in one exchange", MAX_EXCHANGED)
        self.counters.received(request)
        opened = await self._open(request)
        self._admit(opened.sender)
        self._absorb(opened)
        known = {(d.identity_key, d.version) for d in request.known}
        updates = [
            p.signed for p in self.directory.members() if (p.descriptor.identity_key, p.descriptor.version) not in known
        ]
        signed = self.publisher.sign(
            overlay_pb2.ExchangeResponse(sender=self.describe(), updates=updates[:MAX_EXCHANGED])
        )
        self.counters.sent(signed)
        return signed

    def _absorb(self, opened: OpenedMessage) -> Peer | None:
        """Takes in a verified message's news; returns its sender, if its descriptor was new to us."""
        sender = None
        for signed, descriptor in opened.descriptors:
            peer = self._learn(signed, descriptor)
            if descriptor is opened.sender:
                sender = peer
        for update, left in opened.claims:
            if update.state in (SUSPECT, DEAD):
                self._on_claim(update, left)
        return sender

    def _learn(self, signed: common_pb2.SignedDescriptor, descriptor: common_pb2.NodeDescriptor) -> Peer | None:
        peer = self.directory.offer(signed, descriptor)
        if peer is not None:
            if peer.alive:  # a newer descriptor of a member still suspect or dead is no news
                self._suspicions.pop(peer.node_id, None)
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

    def _refute(self, incarnation: int, state: overlay_pb2.MemberState.ValueType, claimant: bytes) -> None:
        if self._left or incarnation != self.publisher.incarnation:
            return  # a claim about a past (or a made-up future) incarnation needs no answer
        # Only this node can sign a descriptor with a higher incarnation.
        self.publisher.refute()
        self.counters.refutations += 1
        # Others found this node slow enough to suspect: likely it is (Lifeguard).
        self._health(1, "refuting a suspicion")
        signed = self.describe()
        self._enqueue(
            overlay_pb2.MemberUpdate(
                identity_key=self.own_key, state=ALIVE, incarnation=self.publisher.incarnation, descriptor=signed
            )
        )
        log.info("refuting a claim about this node", claimed=overlay_pb2.MemberState.Name(state))
        self._push_refutation(claimant)

    def _push_refutation(self, claimant: bytes) -> None:
        """Sends the refutation now, to the claimant and a few others (``indirect_probes`` + 1
        in all), not with the next probe: the period of a node slow enough to be suspected is
        stretched by its health multiplier, and the answers it gives late are dropped by their
        callers. One push at a time; a refutation during one rides on the next probes."""
        if self._pushing is not None and not self._pushing.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a claim handed over outside the event loop (unit tests)
            return
        first = self.directory.get(native.node_id(claimant)) if len(claimant) == 32 else None
        others = [p for p in self.directory.members() if p.alive and p is not first]
        targets = ([first] if first is not None and first.alive else []) + self._rng.sample(
            others, min(self.settings.indirect_probes + 1, len(others))
        )
        timeout = self.probe_timeout_s()
        self._pushing = loop.create_task(self._ping_all(targets[: self.settings.indirect_probes + 1], timeout))

    async def _ping_all(self, peers: list[Peer], timeout: float) -> None:
        try:
            await asyncio.gather(*(self._ping(p, timeout) for p in peers))
        except (DescriptorError, ValueError) as error:  # as in the protocol period
            log.warning("pushing a refutation failed", reason=str(error))

    def _on_claim(self, update: overlay_pb2.MemberUpdate, left: bool) -> None:
        """A verified claim: the member's own leave (``left``: dead at once) or a claimant's
        suspicion (a DEAD claim without a leave counts as one), about its current incarnation."""
        key, incarnation = update.identity_key, update.incarnation
        if key == self.own_key:
            self._refute(incarnation, update.state, update.claimant)
            return
        if len(key) != 32:
            return
        node_id = native.node_id(key)
        if left:
            if self.directory.set_state(node_id, DEAD, incarnation, update.leave_signature) is not None:
                self._suspicions.pop(node_id, None)
                self._enqueue(update)
            return
        claimant = update.claimant
        if claimant == key or (claimant != self.own_key and self.directory.get(native.node_id(claimant)) is None):
            return  # only members' suspicions count (and nobody suspects itself)
        peer = self.directory.get(node_id)
        if peer is None or incarnation != peer.descriptor.incarnation:
            return
        if peer.state == ALIVE:
            if self.directory.set_state(node_id, SUSPECT, incarnation) is not None:
                minimum = self._base_suspicion_s()
                started = Suspicion(
                    claimant,
                    expected_confirmations(self.settings.suspicion_mult, len(self.directory.members())),
                    minimum,
                    minimum * self.settings.suspicion_max_mult,
                    time.monotonic(),
                )
                started.stretch(self.awareness.multiplier)
                self._suspicions[node_id] = started
                self._enqueue(update)
        elif peer.state == SUSPECT and (suspicion := self._suspicions.get(node_id)) and suspicion.confirm(claimant):
            self._enqueue(update)  # pass the confirmation on: others count it too

    def _enqueue(self, update: overlay_pb2.MemberUpdate) -> None:
        self._news[update.identity_key] = _News(update)

    # --- what goes out -------------------------------------------------------------------------

    def _retransmit_limit(self) -> int:
        return self.settings.retransmit_mult * math.ceil(math.log10(len(self.directory.members()) + 2))

    def _packet(
        self, probe_target: bytes = b"", probe_acked: bool = False, told: overlay_pb2.MemberUpdate | None = None
    ) -> overlay_pb2.SwimPacket:
        """The next packet: the least-sent news, and ``told`` (a suspicion told to the member
        it is about) in the room of one piece, so a packet never carries more than max_piggyback."""
        room = self.settings.max_piggyback - (told is not None)
        news = sorted(self._news.values(), key=lambda n: n.sent)[:room]
        limit = self._retransmit_limit()
        for item in news:
            item.sent += 1
            if item.sent >= limit:
                del self._news[item.update.identity_key]
        return overlay_pb2.SwimPacket(
            sender=self.describe(),
            updates=[n.update for n in news] + ([told] if told is not None else []),
            probe_target=probe_target,
            probe_acked=probe_acked,
        )  # signed by the caller, once complete

    async def _send(self, peer: Peer, packet: overlay_pb2.SwimPacket, timeout: float) -> overlay_pb2.SwimPacket | None:
        stub = overlay_pb2_grpc.OverlayStub(self._channels.get(peer.descriptor.address))
        signed = self.publisher.sign(packet)
        self.counters.sent(signed)
        try:
            answer: overlay_pb2.SwimPacket = await stub.Swim(signed, timeout=timeout)
            self.counters.received(answer)
            opened = await self._open(answer)
        except aio.AioRpcError:
            return None
        except Unauthenticated as error:
            log.warning("gossip answer refused", peer=peer.node_id[:16], reason=str(error))
            return None
        self._absorb(opened)
        if opened.sender.identity_key != peer.descriptor.identity_key:
            # Someone else answers at the address this member publishes: a stranger's descriptor
            # naming a member's address (or a stale one). Only the member's own answer counts.
            log.warning(
                "another node answers at a member's address",
                member=peer.node_id[:16],
                answered_by=native.node_id(opened.sender.identity_key)[:16],
            )
            return None
        return answer

    async def _ping(self, peer: Peer, timeout: float) -> bool:
        told = None
        if peer.state == SUSPECT:  # Lifeguard's buddy system: it hears at once, and can refute
            told = self.publisher.claim(peer.descriptor.identity_key, SUSPECT, peer.claimed_incarnation)
        return await self._send(peer, self._packet(told=told), timeout) is not None

    async def _ping_via(self, helper: Peer, target: Peer, timeout: float) -> bool | None:
        """True: the helper reached the target; False: it did not (a nack); None: no answer."""
        answer = await self._send(helper, self._packet(probe_target=target.descriptor.identity_key), timeout)
        return None if answer is None else answer.probe_acked

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
        """One protocol period's probe of the next member in turn (see :meth:`probe`)."""
        target = self._next_target()
        if target is not None:
            await self.probe(target)

    async def probe(self, target: Peer) -> bool:
        """Direct, then indirect, then suspicion; returns whether the member answered. Timeouts
        are stretched by the health multiplier, and the outcome moves it (memberlist's deltas):
        a direct answer -1; a failure +1 per helper that did not answer at all (a helper's
        "not reached" means the member, not this node, is the trouble), or +1 with no helpers."""
        period, timeout = self.probe_interval_s(), self.probe_timeout_s()
        self.counters.probes += 1
        if await self._ping(target, timeout):
            self._health(-1, "probe answered")
            return True
        helpers = [p for p in self.directory.members() if p.alive and p.node_id != target.node_id]
        helpers = self._rng.sample(helpers, min(self.settings.indirect_probes, len(helpers)))
        if helpers:
            answers = await asyncio.gather(*(self._ping_via(h, target, period - timeout) for h in helpers))
            if any(answers):
                return True
            self._health(sum(1 for a in answers if a is None), "helpers did not answer")
        else:
            self._health(1, "probe unanswered")
        self.counters.probe_failures += 1
        self._suspect(target.node_id)
        return False

    def suspect(self, node_id: str) -> None:
        """A caller's request to a member failed. A healthy node suspects it at once (a new
        suspicion, or a confirmation of one). A node whose own health is degraded first probes
        it, out of turn and with its stretched timeouts, and suspects it only if that probe
        fails: the caller's timeout was not stretched, so the failure may be this node's own
        slowness. At most one such probe per member at a time."""
        if self.awareness.score == 0:
            self._suspect(node_id)
            return
        peer = self.directory.get(node_id)
        if peer is None or not peer.alive or self._left or node_id in self._checks:
            return
        task = asyncio.get_running_loop().create_task(self._check(peer))
        self._checks[node_id] = task
        task.add_done_callback(lambda _: self._checks.pop(node_id, None))

    async def _check(self, peer: Peer) -> None:
        try:
            await self.probe(peer)
        except (DescriptorError, ValueError) as error:  # as in the protocol period
            log.warning("probe out of turn failed", reason=str(error))

    def _suspect(self, node_id: str) -> None:
        """This node's own probe failed: a new suspicion, or a confirmation of one; the member
        is declared dead unless it refutes in time."""
        peer = self.directory.get(node_id)
        if peer is not None and peer.state != DEAD:
            incarnation = peer.descriptor.incarnation
            self._on_claim(self.publisher.claim(peer.descriptor.identity_key, SUSPECT, incarnation), left=False)

    def _base_suspicion_s(self) -> float:
        members = max(len(self.directory.members()), 1)
        return self.settings.suspicion_mult * max(1.0, math.log10(members)) * self.settings.probe_interval_s

    def suspicion_timeout_s(self) -> float:
        """The shortest suspicion (fully confirmed) this node applies now, health multiplier
        included; an unconfirmed one lasts suspicion_max_mult times more."""
        return self.awareness.scale(self._base_suspicion_s())

    def expire(self, now: float | None = None) -> None:
        """Declares dead the suspects whose suspicion timed out; forgets long-dead members."""
        now = time.monotonic() if now is None else now
        for peer in self.directory.peers():
            if peer.state == SUSPECT:
                suspicion = self._suspicions.get(peer.node_id)
                expired = (
                    suspicion.expired(now)
                    if suspicion is not None
                    else now - peer.state_since >= self.suspicion_timeout_s()  # made suspect by hand
                )
                if expired:
                    self._suspicions.pop(peer.node_id, None)
                    if self.directory.set_state(peer.node_id, DEAD, peer.claimed_incarnation) is not None:
                        # Others take this as this node's suspicion (only a leave is dead at once).
                        self._enqueue(
                            self.publisher.claim(peer.descriptor.identity_key, DEAD, peer.claimed_incarnation)
                        )
            elif peer.state == DEAD and now - peer.state_since >= self.settings.dead_retention_s:
                self.directory.forget(peer.node_id)

    # --- joining, repair, leaving --------------------------------------------------------------

    async def exchange(self, address: str) -> bool:
        """Push-pull with one member: both end up with the newer of each other's descriptors."""
        request = overlay_pb2.ExchangeRequest(
            sender=self.describe(),
            known=[
                overlay_pb2.DescriptorDigest(identity_key=p.descriptor.identity_key, version=p.descriptor.version)
                for p in self.directory.members()
            ],
        )
        stub = overlay_pb2_grpc.OverlayStub(self._channels.get(address))
        signed = self.publisher.sign(request)
        self.counters.sent(signed)
        try:
            reply = await stub.Exchange(signed, timeout=max(self.settings.probe_interval_s, 1.0))
            self.counters.received(reply)
            _bounded(len(reply.updates), "descriptors in an exchange's answer", MAX_EXCHANGED)
            opened = await self._open(reply)
        except aio.AioRpcError:
            return False
        except (Unauthenticated, ResourceExhausted) as error:
            log.warning("exchange answer refused", address=address, reason=str(error))
            return False
        self._absorb(opened)
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
        # memberlist's gossip to the dead: a member that died without a goodbye and came back at
        # its address hears from us and rejoins, even one with no seed to join through (the seed).
        dead = [p for p in self.directory.peers() if p.state == DEAD and not p.leave_signature]
        if dead:
            await self.exchange(self._rng.choice(dead).descriptor.address)

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
        packet = overlay_pb2.SwimPacket(sender=self.describe(), updates=[update])
        members = [p for p in self.directory.members() if p.alive]
        targets = self._rng.sample(members, min(self.settings.indirect_probes + 1, len(members)))
        await asyncio.gather(*(self._send(p, packet, self.settings.probe_timeout_s) for p in targets))

    def start(self) -> None:
        if self._left:  # rejoining: a new incarnation outranks the goodbye
            self._left = False
            self.publisher.refute()

        async def run() -> None:
            self._lag.start()
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
                await asyncio.sleep(max(0.0, self.probe_interval_s() - (time.monotonic() - started)))

        self._task = asyncio.get_running_loop().create_task(run())

    async def close(self, leave: bool = True) -> None:
        await self._lag.close()
        for check in [*self._checks.values(), *([self._pushing] if self._pushing is not None else [])]:
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if leave:
                with contextlib.suppress(aio.AioRpcError, asyncio.TimeoutError):
                    await self.leave()
