"""An emulated engine for benchmarks of many nodes on one machine. Never the default for
serving, and anything measured with it says so (its identity's engine is "emulated").

It sleeps instead of computing: prefill costs ``prefill_us_per_token`` for every prompt token not
already in its prefix cache, each generated token costs ``decode_us_per_token`` (slowed by
``batch_slowdown`` per extra running request), and at most ``slots`` requests run at once.
Output is deterministic: the next token is a hash of the whole context, so the same prompt always
yields the same text and ``score`` can say exactly which token was the top choice.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence

from blake3 import blake3

from services.inference.engine import (
    ChatTurn,
    EngineUnavailable,
    GeneratedToken,
    ModelIdentity,
    PositionScore,
    Replay,
    Sampling,
)

__all__ = ["EmulatedEngine"]

PREFIX_CHUNK = 16  # tokens per prefix-cache entry, like a KV-cache page


class EmulatedEngine:
    def __init__(
        self,
        name: str,
        *,
        slots: int = 4,
        prefill_us_per_token: float = 200.0,
        decode_us_per_token: float = 20_000.0,
        batch_slowdown: float = 0.1,
        prefix_cache_chunks: int = 4096,
        vocab_size: int = 32_000,
        context_length: int = 4096,
    ) -> None:
        self.identity = ModelIdentity(
            name=name,
            weights_digest=blake3(f"emulated:{name}:{vocab_size}".encode()).digest(),
            quantization="emulated",
            context_length=context_length,
            engine="emulated",
        )
        self.vocab_size = vocab_size
        self._prefill_s = prefill_us_per_token / 1e6
        self._decode_s = decode_us_per_token / 1e6
        self._batch_slowdown = batch_slowdown
        self._slots = asyncio.Semaphore(slots)
        self._running = 0
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_chunks = prefix_cache_chunks
        self.prefix_hits = 0  # prompt tokens served from the prefix cache, for benchmarks

    def tokenize(self, text: str) -> list[int]:
        # Deterministic stand-in: one token per whitespace-separated word.
        return [int.from_bytes(blake3(w.encode()).digest()[:4], "little") % self.vocab_size for w in text.split()]

    def detokenize(self, token_ids: Sequence[int]) -> bytes:
        return b"".join(f" t{t}".encode() for t in token_ids)

    def apply_chat_template(self, turns: Sequence[ChatTurn]) -> str:
        return "\n".join(f"{t.role}: {t.content}" for t in turns) + "\nassistant:"

    def _next_token(self, context: Sequence[int]) -> int:
        digest = blake3(b"".join(t.to_bytes(4, "little") for t in context[-64:])).digest()
        return int.from_bytes(digest[:4], "little") % self.vocab_size

    def _uncached_prefix_tokens(self, prompt: Sequence[int]) -> int:
        """Prompt tokens not covered by cached chunks; caches the prompt's chunks."""
        covered, hasher = 0, blake3()
        for start in range(0, len(prompt) - len(prompt) % PREFIX_CHUNK, PREFIX_CHUNK):
            hasher.update(b"".join(t.to_bytes(4, "little") for t in prompt[start : start + PREFIX_CHUNK]))
            key = hasher.digest()
            if key in self._cache and covered == start:
                covered = start + PREFIX_CHUNK
                self._cache.move_to_end(key)
            else:
                self._cache[key] = None
                if len(self._cache) > self._cache_chunks:
                    self._cache.popitem(last=False)
        self.prefix_hits += covered
        return len(prompt) - covered

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        async with self._slots:
            self._running += 1
            try:
                context = [*prompt_ids, *resume]  # its tokens follow from the context alone
                await asyncio.sleep(self._uncached_prefix_tokens(context) * self._prefill_s)
                for _ in range(len(resume), sampling.max_new_tokens):
                    await asyncio.sleep(self._decode_s * (1 + self._batch_slowdown * (self._running - 1)))
                    token = self._next_token(context)
                    context.append(token)
                    yield GeneratedToken(token, self.detokenize([token]), 0.0)
            finally:
                self._running -= 1

    async def score(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_alternatives: int
    ) -> list[PositionScore]:
        context, scores = list(prompt_ids), []
        for token in completion_ids:
            expected = self._next_token(context)
            scores.append(PositionScore(0.0 if token == expected else -20.0, token == expected, expected, 0.0))
            context.append(token)
        return scores

    async def replay(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], sampling: Sampling) -> Replay:
        raise EngineUnavailable("the emulated engine has no model logits to replay")

    async def close(self) -> None:
        return None
