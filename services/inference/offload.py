"""WWW.Serve's self-organizing offload: an inference node whose slots are all busy passes a new
request on to a peer that gossip says has a free slot, instead of queueing it.

The request travels like any other: in a one-layer onion circuit to the peer (so it is encrypted
on the wire and only the serving node reads it), carrying its ``ForwardingState``. Every pass
spends one unit of the hop budget and adds the passing node to the visited set, and no node
passes work to a node already visited, so a request is passed on at most ``hop_budget`` times
and never in a loop. The peer's tokens and signed receipt come back unchanged: the receipt names
the node that really served, which is whom the router checks it against.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable

from services.inference.service import InferenceService
from services.relay.circuit import error_message, responses_in
from services.relay.client import CircuitOpener, ClientCircuit, decode_message
from swarmserve.dispatch import NodeState, load_factor, reported_state
from swarmserve.overlay import Membership, Peer
from swarmserve.rpc import InvalidArgument, ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, inference_pb2, relay_pb2

__all__ = ["MAX_VISITED", "Offloader"]

log = get_logger("swarmserve.inference")

MAX_VISITED = 16  # longer visited sets are refused as malformed


class Offloader:
    def __init__(
        self,
        identity_key: bytes,
        stake_of: Callable[[bytes], int],
        membership: Membership,
        open_circuit: CircuitOpener,
        setup_timeout_s: float,
        cell_timeout_s: float,
    ) -> None:
        self._identity_key = identity_key
        self._stake_of = stake_of
        self._random = random.SystemRandom()
        self._membership = membership
        self._open_circuit = open_circuit
        self._setup_timeout_s = setup_timeout_s
        self._cell_timeout_s = cell_timeout_s
        self._sent: dict[str, tuple[int, int]] = {}  # peer -> (descriptor version, requests sent since)
        self.offloaded = 0  # requests a peer took from this node

    def target(self, service: InferenceService, request: inference_pb2.InferenceGenerateRequest) -> Peer | None:
        """The peer to pass this request to, or None to serve (or queue) it here: only when every
        local slot is busy, the hop budget allows, and a peer not yet visited has a free slot by
        its latest descriptor (counting what this node sent it since). Among those, one is drawn
        with probability proportional to its stake plus one (WWW.Serve: stake signals spare
        capacity, and a provider caught cheating loses it); if nothing is queued here yet, it is
        taken only if its load factor beats this node's own."""
        forwarding = request.forwarding
        if len(forwarding.visited) > MAX_VISITED or any(len(key) != 32 for key in forwarding.visited):
            raise InvalidArgument(f"forwarding.visited must hold at most {MAX_VISITED} 32-byte identity keys")
        load = service.admission.snapshot()
        if forwarding.hop_budget == 0 or load.running < service.admission.max_concurrent:
            return None
        visited = {*forwarding.visited, self._identity_key}
        free = [
            (peer, state)
            for peer in self._membership.directory.alive(common_pb2.NODE_ROLE_INFERENCE)
            if peer.serves(request.model)
            and peer.descriptor.identity_key not in visited
            and peer.onion_key_usable()
            # A peer that bills wants tokens of its own key (the request carries this node's, or
            # none); one that checks callers' balances wants a caller. Only others can take it.
            and len(peer.descriptor.token_key) != 32
            and (bool(request.caller_key) or not peer.descriptor.policy.requires_caller)
            and (state := self._state(peer)).running + state.queued < state.slots
        ]
        if not free:
            return None
        weights = [self._stake_of(peer.descriptor.identity_key) + 1 for peer, _ in free]
        best, best_state = self._random.choices(free, weights)[0]
        if load.queued > 0:
            return best  # it would queue behind others here: any free slot is better
        # It would only wait for a running request here: pass it on only if the peer would
        # finish it sooner (a free slot on a much slower node can be worse than a short wait).
        here = NodeState("self", load.recent_latency_s, service.admission.max_concurrent, load.running, load.queued)
        return best if load_factor(best_state) < load_factor(here) else None

    def _pending(self, peer: Peer) -> int:
        version, sent = self._sent.get(peer.node_id, (peer.descriptor.version, 0))
        return sent if version == peer.descriptor.version else 0

    def _state(self, peer: Peer) -> NodeState:
        return reported_state(peer.node_id, peer.descriptor.load, peer.descriptor.capacity, self._pending(peer))

    async def open(self, peer: Peer, request: inference_pb2.InferenceGenerateRequest) -> ClientCircuit:
        """Opens the circuit to ``peer`` and sends the request one hop further on. Raises
        ServiceError if the peer cannot be reached (nothing was sent to the client yet)."""
        passed = inference_pb2.InferenceGenerateRequest()
        passed.CopyFrom(request)
        passed.forwarding.hop_budget -= 1
        passed.forwarding.visited.append(self._identity_key)
        self._sent[peer.node_id] = (peer.descriptor.version, self._pending(peer) + 1)
        circuit = await self._open_circuit([], peer, self._setup_timeout_s, self._cell_timeout_s)
        try:
            await circuit.send(relay_pb2.CircuitMessage(request=passed))
        except BaseException:
            circuit.close()
            raise
        log.info("offloading", to=peer.node_id[:16], hop_budget_left=passed.forwarding.hop_budget)
        return circuit

    async def relay(self, circuit: ClientCircuit, first: bytes) -> AsyncIterator[bytes]:
        """The peer's messages (it took the request), passed on as it serialized and padded them,
        until its summary or error; each is decoded only to see where the stream ends."""
        self.offloaded += 1
        plaintext = first
        try:
            while True:
                yield plaintext
                responses = responses_in(decode_message(plaintext))
                if responses is None or responses[-1].HasField("summary"):
                    return
                plaintext = await circuit.receive_plaintext()
        except ServiceError as error:
            yield error_message(error.code, str(error))
        finally:
            circuit.close()
