"""The inference node's behaviour, independent of gRPC: validation against the provider policy,
admission, the generation loop (stop strings, finish reasons, timing), receipts, scoring and
status. The servicer (``servicer.py``) only converts protobuf to these types and back."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import structlog

from services.inference.admission import Admission, LoadSnapshot
from services.inference.billing import Billing, refuse_without_ledger
from services.inference.config import ProviderPolicy
from services.inference.engine import (
    ChatTurn,
    Engine,
    FinishReason,
    GeneratedToken,
    PositionScore,
    Sampling,
)
from services.inference.stops import StopMatcher
from swarmserve import native
from swarmserve.receipts import ReceiptWriter
from swarmserve.rpc import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from swarmserve.telemetry import get_logger
from swarmserve.telemetry.metrics import NodeMetrics
from swarmserve.v1 import common_pb2

__all__ = [
    "GenerateRequest",
    "GenerationSummary",
    "InferenceService",
    "SamplingRequest",
    "TokenEvent",
]

log = get_logger("swarmserve.inference")

MAX_REQUEST_ID = 64
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
MAX_ALTERNATIVES = 20
_CHAT_ROLES = {"system", "user", "assistant"}
_FINISH = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.END_OF_SEQUENCE: common_pb2.FINISH_REASON_END_OF_SEQUENCE,
}


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling as asked for; zero values mean "node default" or "off"."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    prompt: str | None = None
    chat: tuple[ChatTurn, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    sampling: SamplingRequest = field(default_factory=SamplingRequest)
    request_id: str = ""
    caller_key: bytes = b""  # only when its signature over the request checked out
    tokens: tuple[tuple[bytes, bytes], ...] = ()  # payment tokens: (nonce, output)
    resume: tuple[int, ...] = ()  # a resumed stream: the tokens other nodes served before


@dataclass(frozen=True)
class TokenEvent:
    token: GeneratedToken
    index: int  # position in the whole stream (a resumed stream's first one is after its prefix)
    checkpoint: bytes = b""  # the signature over the receipt of the stream so far
    receipt_header: bytes = b""  # with the first token only: what the checkpoints extend


@dataclass(frozen=True)
class GenerationSummary:
    finish_reason: FinishReason
    receipt: common_pb2.SignedReceipt


@dataclass(frozen=True)
class _Prepared:
    request_id: str
    engine: Engine
    prompt_ids: list[int]
    sampling: Sampling
    payment: tuple[tuple[bytes, bytes], ...] = ()  # tokens to spend once a slot is granted
    resume: tuple[int, ...] = ()


class InferenceService:
    def __init__(
        self,
        identity: native.Identity,
        engines: Mapping[str, Engine],
        policy: ProviderPolicy,
        billing: Billing | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.identity = identity
        metrics = metrics or NodeMetrics()
        self._prefill = metrics.histogram(
            "swarmserve_inference_prefill_seconds", "from a request's slot to its first token (the prompt's prefill)"
        )
        self._decode = metrics.histogram(
            "swarmserve_inference_decode_seconds", "from a request's first token to its last"
        )
        self._tokens = metrics.counter(
            "swarmserve_inference_tokens", "prompt tokens read and tokens generated", ["kind"]
        )
        self.billing = billing  # with a ledger: who is served, and what each stream cost the caller
        self.engines = dict(engines)
        self.policy = policy
        self.admission = Admission(policy.max_concurrent, policy.max_queue)

    # --- validation -----------------------------------------------------------------------

    def _engine(self, model: str) -> Engine:
        if not model:
            raise InvalidArgument("model is required")
        engine = self.engines.get(model)
        if engine is None:
            served = ", ".join(sorted(self.engines))
            raise NotFound(f"model {model!r} is not served by this node (it serves: {served})")
        return engine

    def _check_open(self) -> None:
        if not self.policy.serving_at(dt.datetime.now(dt.UTC)):
            windows = ", ".join(f"{w.start}-{w.end}" for w in self.policy.serving_hours)
            raise Unavailable(f"outside this node's serving hours ({windows} UTC)")

    @property
    def requires_caller(self) -> bool:
        """Whether requests must be signed by the caller that pays (published in the policy)."""
        return self.billing is not None and self.billing.requires_caller

    def _check_caller(self, caller_key: bytes) -> None:
        if self.billing is not None:
            self.billing.admit(caller_key)
        else:
            refuse_without_ledger(self.policy, caller_key)

    def _check_ids(self, engine: Engine, ids: Sequence[int], what: str) -> None:
        bad = [token for token in ids if not 0 <= token < engine.vocab_size]
        if bad:
            raise InvalidArgument(
                f"{what} has token ids outside the vocabulary (0..{engine.vocab_size - 1}): {bad[:5]}"
            )

    def _prompt_ids(self, engine: Engine, request: GenerateRequest) -> list[int]:
        given = [
            request.prompt is not None,
            request.chat is not None,
            request.prompt_ids is not None,
        ]
        if sum(given) != 1:
            raise InvalidArgument("exactly one of prompt, chat or prompt_tokens is required")
        if request.prompt is not None:
            if not request.prompt.strip():
                raise InvalidArgument("prompt is empty")
            # Tokenizing a huge text costs time: refuse what cannot fit before doing it.
            if len(request.prompt) > self.policy.max_prompt_tokens * 32:
                raise InvalidArgument(
                    f"prompt is {len(request.prompt)} characters; this node accepts at most "
                    f"{self.policy.max_prompt_tokens} tokens"
                )
            return engine.tokenize(request.prompt)
        if request.chat is not None:
            if not request.chat:
                raise InvalidArgument("chat has no messages")
            for turn in request.chat:
                if turn.role not in _CHAT_ROLES:
                    raise InvalidArgument(f"chat role {turn.role!r} must be one of system, user, assistant")
            if sum(len(t.content) for t in request.chat) > self.policy.max_prompt_tokens * 32:
                raise InvalidArgument(f"chat is longer than this node's {self.policy.max_prompt_tokens} tokens")
            try:
                return engine.tokenize(engine.apply_chat_template(request.chat))
            except ValueError as error:
                raise InvalidArgument(str(error)) from None
        ids = list(request.prompt_ids or ())
        if not ids:
            raise InvalidArgument("prompt_tokens is empty")
        self._check_ids(engine, ids, "prompt_tokens")
        return ids

    def _sampling(self, asked: SamplingRequest, engine: Engine, prompt_len: int) -> Sampling:
        policy = self.policy
        if asked.max_new_tokens > policy.max_new_tokens:
            raise InvalidArgument(
                f"max_new_tokens {asked.max_new_tokens} exceeds this node's limit of {policy.max_new_tokens}"
            )
        max_new = asked.max_new_tokens or policy.default_new_tokens
        if prompt_len + max_new > engine.identity.context_length:
            raise InvalidArgument(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                f"context of {engine.identity.context_length} tokens"
            )
        checks = [
            (
                math.isfinite(asked.temperature) and 0.0 <= asked.temperature <= 5.0,
                "temperature must be in [0, 5]",
            ),
            (math.isfinite(asked.top_p) and 0.0 <= asked.top_p <= 1.0, "top_p must be in [0, 1]"),
            (0 <= asked.top_k <= engine.vocab_size, f"top_k must be in [0, {engine.vocab_size}]"),
            (
                math.isfinite(asked.repetition_penalty) and 0.0 <= asked.repetition_penalty <= 10.0,
                "repetition_penalty must be in [0, 10] (0 or 1: none)",
            ),
            (len(asked.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            (
                all(0 < len(s) <= MAX_STOP_LENGTH for s in asked.stop),
                f"stop strings must be 1 to {MAX_STOP_LENGTH} characters",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)
        return Sampling(
            max_new_tokens=max_new,
            temperature=asked.temperature,
            top_p=asked.top_p or 1.0,
            top_k=asked.top_k,
            repetition_penalty=asked.repetition_penalty or 1.0,
            seed=asked.seed if asked.seed is not None else secrets.randbits(63),
            stop=asked.stop,
        )

    def prepare(self, request: GenerateRequest) -> _Prepared:
        """Every check that can refuse a request, before it takes a slot."""
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        engine = self._engine(request.model)
        self._check_open()
        self._check_caller(request.caller_key)
        prompt_ids = self._prompt_ids(engine, request)
        if len(prompt_ids) > self.policy.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt is {len(prompt_ids)} tokens; this node accepts at most {self.policy.max_prompt_tokens}"
            )
        sampling = self._sampling(request.sampling, engine, len(prompt_ids))
        if request.resume:
            if len(request.resume) > sampling.max_new_tokens:
                raise InvalidArgument(
                    f"resume_token_ids holds {len(request.resume)} tokens, more than max_new_tokens "
                    f"({sampling.max_new_tokens}) allows"
                )
            self._check_ids(engine, request.resume, "resume_token_ids")
        payment: tuple[tuple[bytes, bytes], ...] = ()
        if self.billing is not None:
            remaining = sampling.max_new_tokens - len(request.resume)  # a resumed stream pays for the rest
            needed = self.billing.tokens_needed(request.caller_key, len(prompt_ids), remaining)
            if needed:
                self.billing.desk.check(request.tokens, needed)
                payment = request.tokens
        return _Prepared(request.request_id or uuid.uuid4().hex, engine, prompt_ids, sampling, payment, request.resume)

    # --- generation -----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenEvent | GenerationSummary, None]:
        # Bound first, so that even a refusal is logged with the request's id.
        request = replace(request, request_id=request.request_id or uuid.uuid4().hex)
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        prepared = self.prepare(request)
        sampling = prepared.sampling
        accepted_unix_ms = int(time.time() * 1000)
        accepted = time.monotonic()
        async with self.admission.slot(len(prepared.prompt_ids) + sampling.max_new_tokens) as waited:
            if prepared.payment:  # spent once the request is sure to be served (a durable write)
                assert self.billing is not None
                await asyncio.to_thread(self.billing.desk.spend, prepared.payment)
            receipt = ReceiptWriter(
                self.identity,
                prepared.request_id,
                prepared.engine.identity.weights_digest,
                prepared.prompt_ids,
                _sampling_message(sampling),
                prepared.resume,
            )
            header = receipt.header()
            # A resumed stream's delivered text never ends inside a stop string (its server held
            # such tokens back), so the matcher starts afresh; positions go on after the prefix.
            stops = StopMatcher(sampling.stop)
            prefix = generated = len(prepared.resume)
            sent = 0
            first_token_at: float | None = None

            def event(token: GeneratedToken) -> TokenEvent:
                nonlocal sent, first_token_at
                first_token_at = first_token_at or time.monotonic()
                checkpoint = receipt.add(token.token_id, token.text)
                sent += 1
                return TokenEvent(token, prefix + sent - 1, checkpoint, header if sent == 1 else b"")

            stream = prepared.engine.generate(prepared.prompt_ids, sampling, prepared.resume)
            async with aclosing(stream):
                async for token in stream:
                    generated += 1
                    for ready in stops.push(token):
                        yield event(ready)
                    if stops.stopped:
                        break
            if stops.stopped:
                finish = FinishReason.STOP
            else:
                for ready in stops.flush():
                    yield event(ready)
                finish = FinishReason.LENGTH if generated >= sampling.max_new_tokens else FinishReason.END_OF_SEQUENCE
            finished = time.monotonic()
            timing = common_pb2.Timing(
                accepted_unix_ms=accepted_unix_ms,
                queue_us=int(waited * 1e6),
                time_to_first_token_us=int(((first_token_at or finished) - accepted) * 1e6),
                total_us=int((finished - accepted) * 1e6),
                prompt_tokens=len(prepared.prompt_ids),
                completion_tokens=sent,
            )
            self.admission.record(finished - accepted, sent, finished - accepted - waited)
            if first_token_at is not None:
                self._prefill.observe(first_token_at - accepted - waited)
                self._decode.observe(finished - first_token_at)
            self._tokens.labels("prompt").inc(len(prepared.prompt_ids))
            self._tokens.labels("completion").inc(sent)
            log.info(
                "generated",
                model=request.model,
                tokens=sent,
                finish=finish.value,
                total_ms=timing.total_us // 1000,
            )
            summary = GenerationSummary(finish, receipt.sign(_FINISH[finish], timing))
        # Sent once the slot is free: a client that sees the summary sees the node's load without it.
        yield summary

    # --- scoring and status ---------------------------------------------------------------

    async def score(
        self,
        model: str,
        expected_digest: bytes,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        top_alternatives: int,
    ) -> tuple[Engine, list[PositionScore]]:
        engine = self._engine(model)
        if expected_digest and expected_digest != engine.identity.weights_digest:
            raise FailedPrecondition(
                f"this node's {model} weights have digest {engine.identity.weights_digest.hex()}, "
                f"not the expected {expected_digest.hex()}"
            )
        if not prompt_ids:
            raise InvalidArgument("prompt_token_ids is empty: scoring needs at least one prompt token")
        if not completion_ids:
            raise InvalidArgument("completion_token_ids is empty")
        if not 0 <= top_alternatives <= MAX_ALTERNATIVES:
            raise InvalidArgument(f"top_alternatives must be in [0, {MAX_ALTERNATIVES}]")
        self._check_ids(engine, prompt_ids, "prompt_token_ids")
        self._check_ids(engine, completion_ids, "completion_token_ids")
        total = len(prompt_ids) + len(completion_ids)
        if total > engine.identity.context_length:
            raise InvalidArgument(f"{total} tokens exceed the model's context of {engine.identity.context_length}")
        async with self.admission.slot(total):
            return engine, await engine.score(prompt_ids, completion_ids, top_alternatives)

    def load(self) -> LoadSnapshot:
        return self.admission.snapshot()


def _sampling_message(sampling: Sampling) -> common_pb2.SamplingParams:
    """The sampling parameters as applied (seed included), as the receipt records them."""
    return common_pb2.SamplingParams(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        stop=list(sampling.stop),
    )
