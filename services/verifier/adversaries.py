"""Cheating providers, for the tests and the verification benchmark: engines that claim to be
the honest model (its name and weights digest, so they sign receipts naming it) but serve
something else. Each wraps a real loaded engine; nothing here is used by a serving node.

- :class:`ClaimingEngine`: another model (say a Q2_K re-quantization) passed off as the claimed one.
- :class:`RandomTokensEngine`: random token ids from the vocabulary.
- :class:`ReplayingEngine`: the answer it generated for its first prompt, sent for every prompt.
- :class:`EarlyStopEngine`: the honest answer, cut after a few tokens as if the model had ended it.
- :class:`BiasedJudge`: a judge that votes by a rule of its own (always for one provider, or
  always for the answer shown first) instead of by its judgement.
- :func:`check_score`: the strongest detector of checks we could build from the public source and
  what a provider sees of a request, and :class:`ChallengeAwareEngine`, a provider that serves the
  claimed model to what the detector takes for a check and random tokens to everyone else.
- :func:`challenge_request`: the template challenges verifier nodes sent through routers until
  issue 14 retired them (a provider could tell them from users: AUC 0.997 against this
  detector); kept as what the detector knows and as prompts for the benchmarks.
"""

from __future__ import annotations

import ctypes
import random
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from services.inference.engine import ChatTurn, Engine, GeneratedToken, ModelIdentity, PositionScore, Replay, Sampling
from services.verifier.service import DuelSide, VerifierService
from swarmserve.v1 import common_pb2, inference_pb2, router_pb2, verifier_pb2
from swarmserve.verdicts import open_verdict, sign_verdict

__all__ = [
    "BiasedJudge",
    "ChallengeAwareEngine",
    "ClaimingEngine",
    "EarlyStopEngine",
    "RandomTokensEngine",
    "ReplayingEngine",
    "Seen",
    "challenge_prompt",
    "challenge_request",
    "check_score",
    "requantize_q2k",
]


def requantize_q2k(source: Path, destination: Path) -> Path:
    """Writes ``source`` re-quantized to Q2_K with llama.cpp: the cheaper model a
    :class:`ClaimingEngine` passes off as the real one."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not re-quantize {source}")
    return destination


class ClaimingEngine:
    """Serves with ``inner`` while claiming to be ``claimed``."""

    def __init__(self, inner: Engine, claimed: ModelIdentity) -> None:
        self.inner = inner
        self.identity = claimed
        self.vocab_size = inner.vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def detokenize(self, token_ids: Sequence[int]) -> bytes:
        return self.inner.detokenize(token_ids)

    def apply_chat_template(self, turns: Sequence[ChatTurn]) -> str:
        return self.inner.apply_chat_template(turns)

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        async with aclosing(self.inner.generate(prompt_ids, sampling, resume)) as stream:
            async for token in stream:
                yield token

    async def score(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_alternatives: int
    ) -> list[PositionScore]:
        return await self.inner.score(prompt_ids, completion_ids, top_alternatives)

    async def replay(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], sampling: Sampling) -> Replay:
        return await self.inner.replay(prompt_ids, completion_ids, sampling)

    async def close(self) -> None:
        await self.inner.close()


class RandomTokensEngine(ClaimingEngine):
    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        chooser = random.Random(sampling.seed)
        for _ in range(len(resume), sampling.max_new_tokens):
            token = chooser.randrange(self.vocab_size)
            yield GeneratedToken(token, self.detokenize([token]), -10.0)


class ReplayingEngine(ClaimingEngine):
    def __init__(self, inner: Engine, claimed: ModelIdentity) -> None:
        super().__init__(inner, claimed)
        self._answer: list[GeneratedToken] | None = None

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        if self._answer is None:
            self._answer = [token async for token in self.inner.generate(prompt_ids, sampling)]
        for token in self._answer[len(resume) : sampling.max_new_tokens]:
            yield token


class EarlyStopEngine(ClaimingEngine):
    def __init__(self, inner: Engine, claimed: ModelIdentity, keep: int = 3) -> None:
        super().__init__(inner, claimed)
        self.keep = keep

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        produced = len(resume)
        async with aclosing(self.inner.generate(prompt_ids, sampling, resume)) as stream:
            async for token in stream:
                if produced == self.keep:
                    return
                produced += 1
                yield token


class BiasedJudge(VerifierService):
    """Makes every check an honest judge makes, then votes for ``favour(first_key, second_key)``
    (the providers in the order shown), signed with its real key."""

    def __init__(self, *args: object, favour: Callable[[bytes, bytes], bytes], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._favour = favour

    @classmethod
    def always_for(cls, provider_key: bytes) -> Callable[[bytes, bytes], bytes]:
        return lambda first, second: provider_key if provider_key in (first, second) else first

    @staticmethod
    def always_first(first: bytes, second: bytes) -> bytes:
        return first

    async def judge(
        self, duel_id: str, prompt: str | Sequence[ChatTurn], first: DuelSide, second: DuelSide
    ) -> verifier_pb2.SignedVerdict:
        vote = open_verdict(await super().judge(duel_id, prompt, first, second))
        shown = [common_pb2.Receipt.FromString(side.receipt.receipt).node_key for side in (first, second)]
        voted = self._favour(shown[0], shown[1])
        vote.provider_key, vote.opponent_key = voted, shown[1] if voted == shown[0] else shown[0]
        vote.outcome = verifier_pb2.VERDICT_OUTCOME_PASS
        return sign_verdict(self._identity, vote)


# --- the retired template challenges ---------------------------------------------------------

TEMPLATES = (
    "Write a short paragraph about {topic}.",
    "Explain {topic} to a curious child.",
    "List three facts about {topic}.",
    "What should a beginner know about {topic}?",
    "Give me a one-sentence summary of {topic}.",
    "Why do people care about {topic}?",
    "Describe the history of {topic} briefly.",
    "What are common mistakes people make with {topic}?",
)
TOPICS = (
    "the water cycle", "bread baking", "volcanoes", "the moon", "chess openings", "photosynthesis",
    "bicycles", "honey bees", "the printing press", "rainbows", "compound interest", "glaciers",
    "jazz music", "the human heart", "recycling plastic", "coffee", "lighthouses", "tides",
    "the Roman empire", "electric cars", "sleep", "octopuses", "public libraries", "wind power",
)  # fmt: skip
_CHALLENGE_TOKENS = 32  # a challenge's max_new_tokens


def challenge_prompt(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(topic=rng.choice(TOPICS))


def challenge_request(
    model: str, rng: random.Random, max_new_tokens: int = _CHALLENGE_TOKENS
) -> router_pb2.GenerateRequest:
    """One template challenge, as verifiers handed them to routers: one user message, greedy or
    at temperature 0.7, an explicit seed."""
    return router_pb2.GenerateRequest(
        model=model,
        chat=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=challenge_prompt(rng))]
        ),
        sampling=common_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=rng.choice((0.0, 0.7)), seed=rng.getrandbits(63)
        ),
    )


# --- telling checks from users, as a provider would try -------------------------------------

_TEMPLATE_RE = re.compile("|".join(re.escape(t).replace(re.escape("{topic}"), ".+") for t in TEMPLATES))


@dataclass(frozen=True)
class Seen:
    """What a provider sees of one request (besides its timing and the circuit it came on)."""

    text: str  # the last user message, or the raw prompt
    messages: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    has_seed: bool
    stops: int
    request_id: str

    @classmethod
    def of(cls, request: inference_pb2.InferenceGenerateRequest) -> Seen:
        users = [m.content for m in request.chat.messages if m.role == common_pb2.CHAT_ROLE_USER]
        text = request.prompt if request.WhichOneof("input") == "prompt" else (users[-1] if users else "")
        sampling = request.sampling
        return cls(
            text,
            len(request.chat.messages) or 1,
            sampling.max_new_tokens,
            sampling.temperature,
            sampling.top_p,
            sampling.top_k,
            sampling.repetition_penalty,
            sampling.HasField("seed"),
            len(sampling.stop),
            request.request_id,
        )


def check_score(seen: Seen) -> float:
    """How much ``seen`` looks like a check (higher: more), from everything the public source
    says about how checks are made: the challenge templates and topics, their one-message shape,
    length and temperatures, the explicit seed, and how the request id looks (a duel's suffix, or
    a router's uuid rather than a client's own name)."""
    score = 0.0
    if _TEMPLATE_RE.fullmatch(seen.text.strip()):
        score += 8.0
    if any(topic in seen.text for topic in TOPICS):
        score += 1.0
    if seen.request_id.endswith("-b"):
        score += 8.0
    if re.fullmatch("[0-9a-f]{32}", seen.request_id):
        score += 0.5  # named by a router (a duel's copy), not by a client
    if seen.messages == 1:
        score += 0.5
    if seen.max_new_tokens == _CHALLENGE_TOKENS:
        score += 1.0
    if seen.temperature in (0.0, 0.7):
        score += 0.5
    if seen.has_seed:
        score += 1.0
    if seen.stops == 0 and seen.top_p in (0.0, 1.0) and seen.top_k == 0 and seen.repetition_penalty in (0.0, 1.0):
        score += 0.5
    return score


class ChallengeAwareEngine(RandomTokensEngine):
    """Serves ``inner`` (the claimed model) to prompts the detector takes for checks and random
    tokens to all others. It sees what an engine sees (the prompt's tokens and the sampling), so
    it scores the decoded prompt; ``threshold`` on :func:`check_score`."""

    def __init__(self, inner: Engine, claimed: ModelIdentity, threshold: float = 8.0) -> None:
        super().__init__(inner, claimed)
        self.threshold = threshold
        self.served_honestly = 0
        self.cheated = 0

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        text = self.detokenize(prompt_ids).decode(errors="replace")
        # The chat template wraps the user's message; the detector looks for a template inside.
        user = next((m.group(0) for m in [_TEMPLATE_RE.search(text)] if m), text)
        seen = Seen(user, 1, sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                    sampling.repetition_penalty, sampling.seed is not None, len(sampling.stop), "")  # fmt: skip
        if check_score(seen) >= self.threshold:
            self.served_honestly += 1
            stream = ClaimingEngine.generate(self, prompt_ids, sampling, resume)  # the claimed model
        else:
            self.cheated += 1
            stream = super().generate(prompt_ids, sampling, resume)  # random tokens
        async with aclosing(stream) as tokens:
            async for token in tokens:
                yield token
