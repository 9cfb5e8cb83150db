"""Reproducible decoding: the batches in which a llama.cpp context evaluates a stream, and which
cached positions a new stream may keep.

llama.cpp computes a position's KV entries (and so every logit after it) with kernels chosen by
the shape of the batch that holds it: one row goes through the dot-product kernels, several
rows through llamafile's GEMM (attention, F16/Q8_0/Q4_0 weights), K-quant weights through tiled
kernels from 8 rows, and which of these exist depends on the CPU. The results differ in the last
bits, and 30 layers make that up to a whole logit (measured on the embedded model, Intel Xeon:
the same 30-token prompt gave logits 0.96 apart evaluated token by token and in one batch). A
near-tie then flips a token (on an AMD EPYC, the same greedy request twice diverged at token 5).
So an engine that reuses "whatever the KV cache holds" gives answers that depend on the requests
before, and a stream continued from its first k tokens (prompt + those tokens evaluated as one
prompt) does not continue as it would have.

The rule here makes every position's batch a function of the stream alone:

- the prompt is evaluated in chunks at fixed positions, each chunk one batch: 8 tokens up to
  position 64, then 32 (:func:`chunk_end`; the last chunk may be shorter);
- each generated token is evaluated alone, as generation produces it (one row per step is what
  decoding does anyway), also when a stream is continued: the tokens it had already served are
  evaluated one at a time after the prompt, exactly as the first node evaluated them;
- a cached position is kept only if the batch that computed it is the batch this stream would
  compute it in: whole prompt chunks with the same tokens before and in them, or, for the same
  prompt, generated tokens with the same tokens before them. The last batch is always
  evaluated again, since its logits are the ones the next token is chosen from.

Given the same weights, build, CPU kind and batch sequence, llama.cpp's CPU kernels compute the
same bits: each output element is reduced by one thread in a fixed order (the flash-attention
kernel, which splits long contexts across threads, is off in llama-cpp-python by default; the
tests compare nodes whose contexts run 1 and 2 threads). So the same request gives the same tokens
on a fresh context, a warm one, another slot, another node of the same build and CPU kind, and
when continued from any prefix of its answer. The price (``bench/inference.py``): a cold prompt
pays more, smaller batches (a batch costs about one decode step besides its tokens, 10 to 15 ms
on the embedded model), and a cached shared prefix is reused only up to its last whole chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Evaluation", "chunk_end", "chunk_floor", "reusable_positions"]

# The chunk layout is part of what makes two nodes decode alike: nodes that chunk prompts
# differently give different tokens. Short chunks near the start let a cached system prompt
# (24 tokens with SmolLM2's chat template) be reused whole, the common case of chat traffic;
# longer ones after it cost a cold long prompt fewer batches, and waste at most 31 tokens of a
# long cached prefix. Measured against 8, 16, 32 and 64 everywhere (bench/inference.py).
FINE_CHUNK, FINE_SPAN, CHUNK = 8, 64, 32


def chunk_end(start: int) -> int:
    """Where the prompt chunk that begins at ``start`` (a chunk boundary) ends, uncut."""
    return start + (FINE_CHUNK if start < FINE_SPAN else CHUNK)


def chunk_floor(position: int) -> int:
    """The last chunk boundary at or before ``position``."""
    size = FINE_CHUNK if position < FINE_SPAN else CHUNK
    return position // size * size


@dataclass(frozen=True)
class Evaluation:
    """The tokens a context evaluates for one stream: the prompt, then the generated tokens
    (those already served when a stream is continued, and those generation adds)."""

    prompt: tuple[int, ...]
    generated: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a stream needs at least one prompt token")

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + self.generated

    @property
    def last_batch_start(self) -> int:
        """Where the batch whose last row gives the next token's logits begins."""
        if self.generated:
            return len(self.prompt) + len(self.generated) - 1
        return chunk_floor(len(self.prompt) - 1)

    def batches(self, start: int) -> Iterator[tuple[int, ...]]:
        """The batches that evaluate positions ``start`` onwards; ``start`` must be where one of
        this stream's batches begins (as :func:`reusable_positions` returns)."""
        tokens, length = self.tokens, len(self.prompt)
        if start < length and chunk_floor(start) != start:
            raise ValueError(f"position {start} is inside a prompt chunk")
        while start < length:
            end = min(chunk_end(start), length)
            yield tokens[start:end]
            start = end
        for position in range(start, len(tokens)):
            yield tokens[position : position + 1]


def reusable_positions(cached: Evaluation | None, wanted: Evaluation) -> int:
    """How many leading positions of ``wanted`` a context that evaluated ``cached`` already holds
    exactly as ``wanted`` would compute them; always a batch boundary of ``wanted``, and never
    past the start of its last batch."""
    if cached is None:
        return 0
    common = 0
    for held, needed in zip(cached.tokens, wanted.tokens, strict=False):
        if held != needed:
            break
        common += 1
    if len(cached.prompt) == len(wanted.prompt) and common >= len(wanted.prompt):
        keep = common  # the same prompt, chunked alike; generated tokens one at a time in both
    else:
        keep = chunk_floor(min(common, len(cached.prompt), len(wanted.prompt)))
    return min(keep, wanted.last_batch_start)
