"""The router's behaviour: pick an inference node and relays from the directory, carry the
request through an onion circuit, stream the tokens back as they arrive, and check (then
co-sign) the serving node's receipt against exactly the tokens relayed."""

from __future__ import annotations

import asyncio
import codecs
import random
import time
import uuid
from collections.abc import AsyncGenerator, Collection, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import grpc
import structlog
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.relay.circuit import responses_in
from services.relay.client import ClientCircuit, circuit_opener
from services.relay.links import LinkPlane
from services.relay.multipath import MultipathCircuit
from services.router.audits import Auditor
from services.router.circuit_pool import CircuitPool
from services.router.config import RouterConfig
from services.router.duels import DuelOrganiser
from services.router.telemetry import RouterTelemetry
from services.router.wallet import TokenWallet
from services.verifier.service import DuelSide
from swarmserve import native
from swarmserve.chain import ChainReplica
from swarmserve.chain.callers import sign_as_caller
from swarmserve.chain.payments import most_prompt_tokens, price_credits, tokens_for
from swarmserve.dispatch import (
    CentralOraclePolicy,
    Hop,
    LocalOnlyPolicy,
    NodeState,
    NoDiversePath,
    OverlayPolicy,
    Policy,
    RandomPolicy,
    RoundRobinPolicy,
    choose_path,
    network_of,
    reported_state,
)
from swarmserve.overlay import Membership, Peer
from swarmserve.receipts import (
    ReceiptError,
    checkpoint_receipt,
    prompt_digest,
    sampling_mismatch,
    sign_stream_receipt,
    verify_segments,
)
from swarmserve.rpc import (
    ChannelPool,
    DataLoss,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
)
from swarmserve.telemetry import get_logger
from swarmserve.telemetry.metrics import NodeMetrics
from swarmserve.trust import ChainReputation
from swarmserve.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    relay_pb2,
    router_pb2,
)

__all__ = ["RouterService", "TokenDelta", "affinity_key", "forward_request"]

log = get_logger("swarmserve.router")


@dataclass(frozen=True)
class TokenDelta:
    """Text that can be shown now (UTF-8 is never split) and the token behind it, if any."""

    text: str
    token_id: int | None
    token_bytes: bytes
    index: int
    logprob: float


@dataclass
class _Stream:
    """What one client's stream has received so far, over all its segments."""

    ids: list[int] = field(default_factory=list)
    texts: list[bytes] = field(default_factory=list)
    segments: list[common_pb2.SignedReceipt] = field(default_factory=list)  # the cut ones, co-signed, in order
    sampling: common_pb2.SamplingParams | None = None  # as the first segment's server resolved it
    weights_digest: bytes = b""
    first_token_at: float | None = None
    failed_at: float | None = None  # the last failure, until the resumed stream's first token
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def cut(self, signed: common_pb2.SignedReceipt, body: common_pb2.Receipt) -> None:
        self.segments.append(signed)
        if self.sampling is None:
            self.sampling, self.weights_digest = body.sampling, body.model_digest

    def continuation(
        self, forwarded: inference_pb2.InferenceGenerateRequest, rng: random.Random
    ) -> inference_pb2.InferenceGenerateRequest:
        """The request that resumes this stream: the same request under a fresh id, with the
        tokens delivered and the sampling as first applied (the length limit resolved, the seed)."""
        resumed = inference_pb2.InferenceGenerateRequest()
        resumed.CopyFrom(forwarded)
        resumed.request_id = uuid.UUID(int=rng.getrandbits(128), version=4).hex
        resumed.resume_token_ids[:] = self.ids
        if self.sampling is not None:
            resumed.sampling.max_new_tokens = self.sampling.max_new_tokens
            resumed.sampling.seed = self.sampling.seed
        return resumed


@dataclass
class _Attempts:
    """What failed under one request so far: nodes not to use again for it (exits that failed,
    hops found down) and relays of failed paths, used again only when no others can serve."""

    excluded: set[str] = field(default_factory=set)
    avoided: set[str] = field(default_factory=set)
    resumptions: int = 0  # times the stream was taken up again after a failure mid-stream

    def allows(self, relays: Sequence[Peer]) -> bool:
        """Whether a ready circuit through ``relays`` may serve this request: all alive, none
        excluded or avoided."""
        return all(r.alive and r.node_id not in self.excluded and r.node_id not in self.avoided for r in relays)


@dataclass
class _Segment:
    """The part of a stream one node serves: where it starts, and its latest checkpoint."""

    exit: Peer
    path: list[Peer]
    start: int
    header: bytes = b""
    checkpoint: bytes = b""
    summary: inference_pb2.InferenceSummary | None = None


class RouterService:
    def __init__(
        self,
        identity: native.Identity,
        membership: Membership,
        channels: ChannelPool,
        config: RouterConfig,
        chain: ChainReplica | None,
        trust: ChainReputation,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.identity = identity
        self.telemetry = RouterTelemetry(metrics or NodeMetrics())
        self.chain = chain  # with a ledger: providers are paid by cheque, duels recorded
        self.trust = trust
        self.membership = membership
        self.directory = membership.directory
        self.channels = channels
        self.config = config
        self._random = random.SystemRandom()
        self._policy = self._make_policy()
        self.duels = DuelOrganiser(self, config.duels)
        self.audits = Auditor(self, config.audits)
        # The router only originates circuits: a set-up arriving on its links is refused.
        self.links = LinkPlane(channels, idle_timeout_s=config.cell_timeout_s)
        self.open_circuit = circuit_opener(config.data_plane, channels, self.links)
        self.pool: CircuitPool[ClientCircuit] = CircuitPool(
            config.circuit_pool, self._build_circuit, self.directory.get
        )
        if metrics is not None:
            self.pool.report_to(metrics)
        # What this router saw itself, fresher than gossip: when each of its requests still in
        # flight at a node started, and an average of the latency it observed there.
        self._in_flight: dict[str, list[float]] = {}
        self._observed_latency: dict[str, float] = {}
        # Payment tokens for billing providers (with a ledger): bought by cheque, spent unlinkably.
        self.wallet = TokenWallet(chain, channels) if chain is not None else None

    async def close(self) -> None:
        await self.duels.close()
        await self.audits.close()
        await self.pool.close()
        await self.links.close()

    def _check(self, request: router_pb2.GenerateRequest) -> int:
        size = request.ByteSize()
        if size > self.config.max_request_bytes:
            raise PayloadTooLarge(
                f"request is {size} bytes; this router accepts at most {self.config.max_request_bytes}"
            )
        if not request.model:
            raise InvalidArgument("model is required")
        if request.WhichOneof("input") is None:
            raise InvalidArgument("one of prompt or chat is required")
        if len(request.request_id) > 64:
            raise InvalidArgument("request_id is longer than 64 characters")
        hops = request.privacy.hops if request.privacy.HasField("hops") else self.config.default_hops
        if hops > self.config.max_hops:
            raise InvalidArgument(f"hops {hops} exceeds this router's maximum of {self.config.max_hops}")
        paths, threshold = request.privacy.paths, request.privacy.threshold
        if paths > self.config.max_paths:
            raise InvalidArgument(f"paths {paths} exceeds this router's maximum of {self.config.max_paths}")
        if threshold > max(paths, 1):
            raise InvalidArgument(f"threshold {threshold} exceeds paths {paths}")
        if paths > 1 and hops == 0:
            raise InvalidArgument("multipath (paths > 1) needs at least one relay per path")
        return hops

    def _candidates(self, model: str, weights_digest: bytes = b"") -> list[Peer]:
        """Live nodes serving the model (with these weights, if given: a resumed stream goes on
        only on the same weights); providers the chain's verdicts put below the trust threshold
        (or convicted) get no traffic, whatever the policy."""
        serving = [
            p
            for p in self._usable(common_pb2.NODE_ROLE_INFERENCE)
            if p.serves(model)
            and (
                not weights_digest
                or any(m.name == model and m.weights_digest == weights_digest for m in p.descriptor.models)
            )
        ]
        book = self.trust.book()
        trusted = [p for p in serving if book.standing(p.descriptor.identity_key).trusted]
        if serving and not trusted:
            raise Unavailable(f"every node serving model {model!r} is below the trust threshold")
        return trusted

    def _usable(self, role: common_pb2.NodeRole.ValueType) -> list[Peer]:
        """Members of ``role`` with a usable onion key: the alive ones, or, when none is, the
        suspected ones too (a suspicion is not a death: under load a busy node's probes run
        late, and refusing every request then would turn a slow swarm into a dead one)."""
        members = [p for p in self.directory.members() if p.has_role(role) and p.onion_key_usable()]
        alive = [p for p in members if p.alive]
        return alive or members

    def _make_policy(self) -> Policy:
        match self.config.dispatch:
            case "round-robin":
                return RoundRobinPolicy()
            case "random":
                return RandomPolicy()
            case "local-only":
                return LocalOnlyPolicy(lambda entry: self._home_id())
            case "central-oracle":
                return CentralOraclePolicy()
            case _:
                return OverlayPolicy()

    def _home_id(self) -> str:
        for peer in self.directory.alive(common_pb2.NODE_ROLE_INFERENCE):
            if peer.descriptor.address == self.config.home:
                return peer.node_id
        raise Unavailable(f"this entry point's own node {self.config.home} is not alive")

    async def choose_exit(
        self, request: router_pb2.GenerateRequest, excluded: set[str] | None = None, weights_digest: bytes = b""
    ) -> Peer:
        """The configured policy (swarmserve.dispatch); ours is prefix affinity among nodes whose
        load factor is acceptable, else the least loaded, with load from each node's gossiped
        descriptor plus what this router sent it since that descriptor was issued. The central
        oracle instead asks every candidate for its true state at every decision."""
        candidates = {
            p.node_id: p
            for p in self._candidates(request.model, weights_digest)
            if p.node_id not in (excluded or set())
        }
        if not candidates:
            raise NotFound(f"no live inference node serves model {request.model!r}")
        key = affinity_key(request)
        if self.config.dispatch == "central-oracle":
            states = await asyncio.gather(*(self._true_state(p) for p in candidates.values()))
        else:
            states = [self._state(p) for p in candidates.values()]
        chosen = self._policy.choose(key, states, self.identity.node_id)
        if chosen not in candidates:
            raise Unavailable(f"node {chosen[:16]} chosen by {self._policy.name} is not a live candidate")
        self._policy.served(chosen, key, time.monotonic())
        self.telemetry.dispatch.labels(self._policy.name).inc()
        return candidates[chosen]

    async def _true_state(self, peer: Peer) -> NodeState:
        stub = inference_pb2_grpc.InferenceStub(self.channels.get(peer.descriptor.address))
        status = await stub.Status(inference_pb2.StatusRequest(), timeout=self.config.setup_timeout_s)
        return reported_state(peer.node_id, status.load, status.capacity)

    def _pending(self, peer: Peer) -> int:
        """This router's requests still in flight at the node that started after its descriptor
        arrived (the descriptor counts the earlier ones)."""
        return sum(1 for started in self._in_flight.get(peer.node_id, ()) if started > peer.last_seen)

    def _finished(self, node_id: str, started: float, latency_s: float | None) -> None:
        """Ends a request's in-flight record; a completed one updates the observed latency
        (an exponential average, so a node's recent behaviour counts, whatever it claims)."""
        in_flight = self._in_flight.get(node_id, [])
        if started in in_flight:
            in_flight.remove(started)
        if latency_s is not None:
            previous = self._observed_latency.get(node_id)
            self._observed_latency[node_id] = latency_s if previous is None else 0.7 * previous + 0.3 * latency_s

    def _state(self, peer: Peer) -> NodeState:
        state = reported_state(peer.node_id, peer.descriptor.load, peer.descriptor.capacity, self._pending(peer))
        observed = self._observed_latency.get(peer.node_id)
        return state if observed is None else replace(state, recent_latency_s=observed)

    def _payment(self, request: router_pb2.GenerateRequest, exit_: Peer, served: int = 0) -> int:
        """Credits to pay ``exit_`` for ``request`` (0: it bills nobody, or serves this router's own
        account free): the bound this router can check itself: at most as many prompt tokens as the
        prompt's bytes allow, and the longest answer the node may give, at its published price
        (less the ``served`` tokens a resumed stream already has)."""
        descriptor = exit_.descriptor
        if len(descriptor.token_key) != 32 or not descriptor.price.credits_per_token:
            return 0
        if self.chain is not None and self.chain.same_account(descriptor.identity_key):
            return 0
        if request.WhichOneof("input") == "prompt":
            prompt_bytes, messages = len(request.prompt.encode()), 1
        else:
            prompt_bytes = sum(len(m.content.encode()) for m in request.chat.messages)
            messages = len(request.chat.messages)
        policy = descriptor.policy
        longest = request.sampling.max_new_tokens or policy.default_new_tokens or policy.max_new_tokens
        if policy.max_new_tokens:
            longest = min(longest, policy.max_new_tokens)
        return price_credits(descriptor.price, most_prompt_tokens(prompt_bytes, messages), max(0, longest - served))

    async def _address(
        self, request: router_pb2.GenerateRequest, forwarded: inference_pb2.InferenceGenerateRequest, exit_: Peer
    ) -> None:
        """What ``exit_`` learns of who pays: this router's identity only if it is of the same
        account (served free) or checks callers' balances (min_balance); otherwise tokens that
        name nobody, for a node that bills, or nothing."""
        forwarded.ClearField("caller_key")
        forwarded.ClearField("caller_signature")
        forwarded.ClearField("tokens")
        descriptor = exit_.descriptor
        own = self.chain is not None and self.chain.same_account(descriptor.identity_key)
        if own or descriptor.policy.requires_caller:
            sign_as_caller(self.identity, forwarded)
        credits = self._payment(request, exit_, len(forwarded.resume_token_ids))
        if credits and self.wallet is not None:
            forwarded.tokens.extend(
                await self.wallet.take(exit_, tokens_for(credits, descriptor.price.credits_per_token))
            )

    async def _start(
        self,
        request: router_pb2.GenerateRequest,
        forwarded: inference_pb2.InferenceGenerateRequest,
        hops: int,
        attempts: _Attempts,
        weights_digest: bytes = b"",
    ) -> tuple[Peer, list[Peer], float, ClientCircuit | MultipathCircuit, relay_pb2.CircuitMessage]:
        """Opens a circuit, sends the request and reads the first answer; returns the exit, when
        the request was dispatched to it, the circuit and the answer. Any failure before that
        answer (a node or relay gone, a refusal, a cell that failed authentication: whatever the
        code) reached nobody, so the request is sent to another node through new relays, up to
        ``failover.start_attempts`` nodes; the last failure is raised. What failed is recorded in
        ``attempts`` (see :meth:`_failed`)."""
        failure: ServiceError | None = None
        multipath = _multipath(request)
        use_pool = multipath[0] == 1
        attempt = 0
        while attempt < self.config.failover.start_attempts:
            attempt += 1
            try:
                exit_ = await self.choose_exit(request, attempts.excluded, weights_digest)
            except NotFound:
                if failure is None:
                    raise
                raise failure from None  # every candidate failed: say how the last one did
            pooled = self.pool.take(exit_, hops, attempts.allows) if use_pool else None
            # too few relays is no fault of the exit's
            paths = [list(pooled.relays)] if pooled else self.choose_paths(hops, exit_, multipath[0], attempts)
            path = [relay for chosen in paths for relay in chosen]
            started = time.monotonic()
            self._in_flight.setdefault(exit_.node_id, []).append(started)
            circuit: ClientCircuit | MultipathCircuit | None = pooled.circuit if pooled else None
            answered = False
            try:
                await self._address(request, forwarded, exit_)
                if circuit is None:
                    opening = time.monotonic()
                    timeouts = (self.config.setup_timeout_s, self.config.cell_timeout_s)
                    if len(paths) > 1:
                        circuit = await MultipathCircuit.open(self.open_circuit, paths, exit_, multipath[1], *timeouts)
                    else:
                        circuit = await self.open_circuit(path, exit_, *timeouts)
                    self.telemetry.circuit_setup.observe(time.monotonic() - opening)
                await circuit.send(relay_pb2.CircuitMessage(request=forwarded))
                first = await circuit.receive()
                answered = True
                if first.WhichOneof("body") == "error":
                    raise ServiceError(first.error.message, _status(first.error.code))
                return exit_, path, started, circuit, first
            except ServiceError as error:
                self._finished(exit_.node_id, started, None)
                if circuit is not None:
                    circuit.close()
                if pooled and not answered:
                    # A ready circuit that failed before the exit answered went stale in the
                    # pool: no fault of the exit's nor a try of the request's. Again, through a
                    # circuit built now, avoiding its relays.
                    log.info("a pooled circuit had failed; building one", exit=exit_.node_id[:16], reason=str(error))
                    attempts.avoided.update(relay.node_id for relay in path)
                    use_pool, attempt = False, attempt - 1
                    continue
                await self._failed(path, exit_, attempts)
                failure = error
                if attempt < self.config.failover.start_attempts:
                    log.info("retrying through another node", failed=exit_.node_id[:16], reason=str(error))
                    self.telemetry.retries.inc()
        assert failure is not None
        raise failure

    async def _build_circuit(self, exit_: Peer, hops: int) -> tuple[list[Peer], ClientCircuit]:
        """A circuit for the pool: relays chosen as a request's would be."""
        relays = self.choose_relays(hops, exit_)
        opening = time.monotonic()
        circuit = await self.open_circuit(relays, exit_, self.config.setup_timeout_s, self.config.cell_timeout_s)
        self.telemetry.circuit_setup.observe(time.monotonic() - opening)
        return relays, circuit

    def _hop(self, peer: Peer) -> Hop:
        """A relay or exit as path choice sees it: its operator and stake from the chain."""
        key = peer.descriptor.identity_key
        operator, stake = key, 0
        if self.chain is not None:
            account = self.chain.state.account(key)
            operator, stake = account.account_key, account.bonded
        return Hop(peer.node_id, operator, network_of(peer.descriptor.address), stake)

    def choose_relays(
        self,
        hops: int,
        exit_: Peer,
        excluded: Collection[str] = (),
        avoided: Collection[str] = (),
        taken: Collection[str] = (),
    ) -> list[Peer]:
        """Relays drawn by stake, no two hops of one operator or network (``dispatch/paths.py``);
        ``avoided`` ones (on a path that failed this request), suspected ones, then ``excluded``
        ones (found down for this request), only when the others cannot make a path; ``taken``
        ones (on another path of a multipath request) never."""
        known = [
            p
            for p in self.directory.members()
            if p.has_role(common_pb2.NODE_ROLE_RELAY)
            and p.node_id != exit_.node_id
            and p.onion_key_usable()
            and p.node_id not in taken
        ]
        members = [p for p in known if p.node_id not in excluded]
        alive = [p for p in members if p.alive]
        # Fresh relays first; relays of a failed path, then suspected ones, then ones that failed
        # a health check for this request (under load a live one can), only when needed.
        pools = [[p for p in alive if p.node_id not in avoided], alive, members, known]
        failure = f"{hops} hops asked for, but only {len(known)} live relays are known"
        for pool in pools:
            if len(pool) < hops:
                continue
            try:
                path = choose_path([self._hop(p) for p in pool], hops, self._hop(exit_), self._random)
            except NoDiversePath as error:
                failure = str(error)
                continue
            by_id = {p.node_id: p for p in pool}
            return [by_id[hop.node_id] for hop in path]
        raise Unavailable(failure)

    def choose_paths(self, hops: int, exit_: Peer, count: int, attempts: _Attempts) -> list[list[Peer]]:
        """``count`` paths of ``hops`` relays to ``exit_``, no relay on two of them (multipath)."""
        paths: list[list[Peer]] = []
        used: set[str] = set()
        for _ in range(count):
            try:
                paths.append(self.choose_relays(hops, exit_, attempts.excluded, attempts.avoided, used))
            except Unavailable as error:
                if count == 1:
                    raise
                raise Unavailable(f"{count} disjoint paths of {hops} relays cannot be made: {error}") from None
            used |= {relay.node_id for relay in paths[-1]}
        return paths

    async def _down(self, peers: Sequence[Peer]) -> set[str]:
        """Which of ``peers`` (the hops of a path that just failed) do not answer a health check
        now: the failure is theirs, so they are left out of this request's next path. The others
        stay usable (a relay's death says nothing against the exit). Whether a node is dead for
        everyone is gossip's to decide (its probes, with Lifeguard's local health): a check that
        timed out here under load must not start a suspicion."""

        async def down(peer: Peer) -> bool:
            stub = health_pb2_grpc.HealthStub(self.channels.get(peer.descriptor.address))
            try:
                reply: health_pb2.HealthCheckResponse = await stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=self.config.failover.probe_timeout_s
                )
            except aio.AioRpcError:
                return True
            return bool(reply.status != health_pb2.HealthCheckResponse.SERVING)

        found = await asyncio.gather(*(down(peer) for peer in peers))
        return {peer.node_id for peer, is_down in zip(peers, found, strict=True) if is_down}

    async def _failed(self, path: Sequence[Peer], exit_: Peer, attempt: _Attempts) -> None:
        """Records a failure of the circuit through ``path`` to ``exit_`` for this request: hops
        found down are left out; the exit too when it is down or nothing else explains the
        failure (a refusal, a bad cell); the path's live relays are avoided where others can
        serve."""
        down = await self._down([*path, exit_])
        attempt.excluded |= down
        if not down or exit_.node_id in down:
            attempt.excluded.add(exit_.node_id)
        attempt.avoided |= {relay.node_id for relay in path}

    async def generate(
        self, request: router_pb2.GenerateRequest, *, excluded: Collection[str] = (), may_check: bool = True
    ) -> AsyncGenerator[TokenDelta | router_pb2.GenerateSummary, None]:
        """Serves one request. ``excluded``: nodes not to send it to; ``may_check``: whether it may
        be sampled for a duel or an audit (not a duel's own second request). Every request, served
        or refused, is counted here (``telemetry.py``)."""
        watch = self.telemetry.watch()
        try:
            async with aclosing(self._serve(request, excluded, may_check)) as events:
                async for event in events:
                    watch.saw(event)
                    yield event
        except BaseException as error:
            watch.failed(error)
            raise
        finally:
            watch.ended()

    async def _serve(
        self, request: router_pb2.GenerateRequest, excluded: Collection[str], may_check: bool
    ) -> AsyncGenerator[TokenDelta | router_pb2.GenerateSummary, None]:
        """Serves ``request`` in segments: one, unless the serving node or a relay fails after
        tokens reached the client; then the stream is resumed on another node serving the same
        weights, from the prompt and the tokens delivered, with the same sampling and seed, and
        the client sees the text go on with no token lost or repeated (``failover`` settings
        bound how often and how long). Every segment's receipt is checked and co-signed."""
        hops = self._check(request)  # every refusal happens before a circuit exists
        request_id = request.request_id or uuid.uuid4().hex  # the client's name for it
        structlog.contextvars.bind_contextvars(request_id=request_id)
        accepted = time.monotonic()
        accepted_unix_ms = int(time.time() * 1000)
        forwarded = forward_request(
            request, self._random, self.config.offload_hops if self.config.dispatch == "overlay" else 0
        )
        stream = _Stream()
        attempts = _Attempts(excluded=set(excluded))
        while True:
            if attempts.resumptions:  # bounded in time from the failure
                try:
                    async with asyncio.timeout(self.config.failover.resume_deadline_s):
                        continuation = stream.continuation(forwarded, self._random)
                        started_segment = await self._start(
                            request, continuation, hops, attempts, stream.weights_digest
                        )
                except TimeoutError:
                    raise Unavailable(
                        f"the stream could not be resumed within {self.config.failover.resume_deadline_s:g} s"
                    ) from None
            else:
                started_segment = await self._start(request, forwarded, hops, attempts)
            exit_, path, started, circuit, message = started_segment
            segment = _Segment(exit_, path, len(stream.ids))
            completed = False
            try:
                try:
                    async for delta in self._relay(circuit, message, stream, segment):
                        yield delta
                except ServiceError as error:
                    circuit.close()
                    await self._cut(request, stream, segment, error, attempts)
                    continue
                summary = segment.summary
                assert summary is not None
                segments, last = self._check_segments(request, stream, summary.receipt, exit_)
                server = self._server_of(last, exit_, request.model)
                completed = True
            finally:
                circuit.close()
                self._finished(exit_.node_id, started, time.monotonic() - started if completed else None)
            break
        if may_check:  # decided after serving, never told to the provider
            self._maybe_check(request, stream, segments)
        tail = stream.decoder.decode(b"", final=True)
        if tail:
            yield TokenDelta(tail, None, b"", len(stream.ids), 0.0)
        finished = time.monotonic()
        yield router_pb2.GenerateSummary(
            finish_reason=summary.finish_reason,
            receipt=segments[-1],
            earlier_segments=segments[:-1],
            stream_receipt=sign_stream_receipt(
                self.identity, request_id, segments, len(stream.ids), last.finish_reason
            ),
            timing=common_pb2.Timing(
                accepted_unix_ms=accepted_unix_ms,
                time_to_first_token_us=int(((stream.first_token_at or finished) - accepted) * 1e6),
                total_us=int((finished - accepted) * 1e6),
                completion_tokens=len(stream.ids),
            ),
            served_by=server,
            hops=hops,
            request_id=request_id,
            entered_at=exit_.node_id,
        )
        log.info(
            "served",
            hops=hops,
            tokens=len(stream.ids),
            served_by=server[:16],
            entered_at=exit_.node_id[:16],
            resumptions=len(segments) - 1,
        )

    async def _relay(
        self,
        circuit: ClientCircuit | MultipathCircuit,
        message: relay_pb2.CircuitMessage,
        stream: _Stream,
        segment: _Segment,
    ) -> AsyncGenerator[TokenDelta, None]:
        """Relays one segment's tokens to the client until its summary (kept in ``segment``);
        raises ServiceError if the circuit or the node fails first."""
        while True:
            for event in _responses(message):
                if not event.HasField("token"):
                    segment.summary = event.summary
                    return
                token = event.token
                if not segment.header:
                    segment.header = token.receipt_header
                segment.checkpoint = token.checkpoint
                now = time.monotonic()
                if stream.failed_at is not None:  # the first token after a failure: the gap the client saw
                    self.telemetry.resume_gap.observe(now - stream.failed_at)
                    stream.failed_at = None
                stream.first_token_at = stream.first_token_at or now
                stream.ids.append(token.token_id)
                stream.texts.append(token.text)
                yield TokenDelta(
                    stream.decoder.decode(token.text), token.token_id, token.text, len(stream.ids) - 1, token.logprob
                )
            message = await circuit.receive()

    async def _cut(
        self,
        request: router_pb2.GenerateRequest,
        stream: _Stream,
        segment: _Segment,
        error: ServiceError,
        attempts: _Attempts,
    ) -> None:
        """A segment failed: keeps its server's last checkpoint as the receipt of the tokens it
        sent, and decides whether to resume; raises (the failure, or DATA_LOSS for tokens their
        server did not sign) when the stream cannot go on."""
        exit_ = segment.exit
        ids, texts = stream.ids[segment.start :], stream.texts[segment.start :]
        if ids:  # (a segment fails before its first token only if its node sent something else)
            try:
                cut = checkpoint_receipt(segment.header, segment.checkpoint, ids, texts)
                body = common_pb2.Receipt.FromString(cut.receipt)
                self._server_of(body, exit_, request.model)
            except ReceiptError as problem:
                raise DataLoss(
                    f"the stream failed ({error}) and its server's signature does not cover the tokens it sent: "
                    f"{problem}"
                ) from None
            prefix = stream.ids[: segment.start]
            if body.prefix_tokens != segment.start or body.prefix_digest != (prompt_digest(prefix) if prefix else b""):
                raise DataLoss("the failed node's segment does not continue from the tokens delivered before it")
            stream.cut(self._cosigned(cut), body)
        attempts.resumptions += 1
        if attempts.resumptions > self.config.failover.max_resumptions:
            log.warning("stream failed; no resumption left", reason=str(error), tokens=len(stream.ids))
            raise error
        stream.failed_at = time.monotonic()
        await self._failed(segment.path, exit_, attempts)
        self.telemetry.resumptions.inc()
        log.info(
            "resuming the stream on another node",
            failed=exit_.node_id[:16],
            reason=str(error),
            tokens=len(stream.ids),
            resumption=attempts.resumptions,
        )

    def _cosigned(self, signed: common_pb2.SignedReceipt) -> common_pb2.SignedReceipt:
        receipt = common_pb2.SignedReceipt()
        receipt.CopyFrom(signed)
        receipt.cosignatures.add(signer_key=self.identity.public_key, signature=self.identity.sign(receipt.receipt))
        return receipt

    def _check_segments(
        self, request: router_pb2.GenerateRequest, stream: _Stream, final: common_pb2.SignedReceipt, exit_: Peer
    ) -> tuple[list[common_pb2.SignedReceipt], common_pb2.Receipt]:
        """Every segment's receipt against exactly the tokens relayed, and the sampling asked;
        returns the co-signed segments and the last one's body. Raises DATA_LOSS."""
        segments = [*stream.segments, final]
        try:
            bodies = verify_segments(segments, stream.ids, stream.texts)
        except ReceiptError as error:
            raise DataLoss(f"the serving node's receipt does not match the tokens relayed: {error}") from None
        mismatch = sampling_mismatch(request.sampling, bodies[-1].sampling)
        if mismatch:  # served otherwise than asked: not paid, not co-signed
            raise DataLoss(f"the serving node did not sample as asked: {mismatch}")
        return [*segments[:-1], self._cosigned(final)], bodies[-1]

    def _maybe_check(
        self, request: router_pb2.GenerateRequest, stream: _Stream, segments: list[common_pb2.SignedReceipt]
    ) -> None:
        """Samples the answer for a duel or an audit. A resumed stream is audited segment by
        segment (each replayed after its prefix); only whole answers are duelled."""
        if len(segments) == 1:
            side = DuelSide(segments[0], stream.ids, stream.texts)
            self.duels.maybe_start(request, side)
            self.audits.maybe_start(request, side)
            return
        start = 0
        for signed in segments:
            end = start + common_pb2.Receipt.FromString(signed.receipt).token_count
            self.audits.maybe_start(
                request, DuelSide(signed, stream.ids[start:end], stream.texts[start:end], stream.ids[:start])
            )
            start = end

    def _server_of(self, receipt: common_pb2.Receipt, exit_: Peer, model: str) -> str:
        """The node that signed the receipt: the circuit's exit, or a member the exit offloaded
        to, which must be known to serve the model with the weights the receipt names."""
        if receipt.node_key == exit_.descriptor.identity_key:
            return exit_.node_id
        server = self.directory.get(native.node_id(receipt.node_key)) if len(receipt.node_key) == 32 else None
        if server is None or not any(
            m.name == model and m.weights_digest == receipt.model_digest for m in server.descriptor.models
        ):
            raise DataLoss("the receipt is signed by a node that is not known to serve this model")
        return server.node_id


def forward_request(
    request: router_pb2.GenerateRequest, rng: random.Random, offload_hops: int
) -> inference_pb2.InferenceGenerateRequest:
    """What the provider is sent for ``request``: nothing but the request itself, with a fresh
    random id (never the client's or a duel's) and always a seed (drawn here when
    the client left it to chance), so that nothing tells a check from a user, or one user from
    another. ``offload_hops``: how far busy nodes may pass it on (only our overlay does)."""
    forwarded = inference_pb2.InferenceGenerateRequest(
        request_id=uuid.UUID(int=rng.getrandbits(128), version=4).hex,
        model=request.model,
        sampling=request.sampling,
        forwarding=inference_pb2.ForwardingState(hop_budget=offload_hops),
    )
    if not forwarded.sampling.HasField("seed"):
        forwarded.sampling.seed = rng.getrandbits(63)
    if request.WhichOneof("input") == "prompt":
        forwarded.prompt = request.prompt
    else:
        forwarded.chat.CopyFrom(request.chat)
    return forwarded


def affinity_key(request: router_pb2.GenerateRequest) -> list[int]:
    """What prefix affinity is computed over. The router sees text, not token ids (the node
    tokenizes), so the request's bytes, read as 4-byte words, stand in for tokens: a chunk of 10
    is 40 bytes of prompt, and requests sharing a system prompt share leading chunks."""
    if request.WhichOneof("input") == "prompt":
        data = request.prompt.encode()
    else:
        data = b"".join(f"{m.role}:{m.content}\n".encode() for m in request.chat.messages)
    return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data) - len(data) % 4, 4)]


def _multipath(request: router_pb2.GenerateRequest) -> tuple[int, int]:
    """(paths, threshold) the request asks for: (1, 1) for one circuit."""
    paths = max(1, request.privacy.paths)
    return paths, request.privacy.threshold or max(1, paths - 1)


def _responses(message: relay_pb2.CircuitMessage) -> Sequence[inference_pb2.InferenceGenerateResponse]:
    """The streamed responses a message from the terminating node carries; raises the error it
    carries instead, or DATA_LOSS for anything else."""
    responses = responses_in(message)
    if responses is not None:
        return responses
    if message.WhichOneof("body") == "error":
        raise ServiceError(message.error.message, _status(message.error.code))
    raise DataLoss("the terminating node sent an unexpected message")


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN
