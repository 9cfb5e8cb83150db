"""Batched decoding in the llama.cpp engine (services/inference/llama_engine.py), and what it
rests on, checked on the pinned llama.cpp and the embedded model.

What it rests on: several sequences decoded together in one context, one batch
per step, give bit-identical logits to each decoded alone in its own context, as long as the KV
cache is kept per sequence (``kv_unified = False``), even when another sequence's whole prompt
rides in the same batch. (With one unified cache the logits moved by up to 1.6 and a greedy
answer diverged: attention then runs over every sequence's cells, masked, in other groupings.)
So "same request, same tokens" can hold with batching; if a llama.cpp upgrade breaks this, these
tests say so. Uses llama.cpp's C API through llama-cpp-python's bindings.

The engine: streams running together are decoded in one pass over the weights per step (counted
by llama.cpp's own graph callback), each gives the tokens and log-probabilities it gives alone,
a stream closed early frees its sequence for the next, and one that outgrows its context fails
alone. Tried broken: one llama_decode per stream (passes doubled), no placeholder between two
generating sequences (llama.cpp split the step in two passes), a prompt chunk in the step's
shared batch (tokens differed from alone)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import llama_cpp as llama
import numpy as np
import pytest

from services.inference.engine import EngineUnavailable, Sampling
from services.inference.llama_engine import LlamaCppEngine
from services.inference.models import default_model_path
from services.inference.schedule import Evaluation
from tests.conftest import MODEL

STEPS = 16
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "Why is the sky blue? Explain briefly."]


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    params.use_extra_bufts = False  # the plain layout, as the engine loads it (llama_engine.py)
    loaded = llama.llama_model_load_from_file(str(default_model_path()).encode(), params)
    assert loaded, "the embedded model loads"
    yield loaded
    llama.llama_model_free(loaded)


class Context:
    def __init__(self, model: Any, sequences: int) -> None:
        params = llama.llama_context_default_params()
        params.n_ctx = 512 * sequences
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn_type = 0  # off, as in the engine
        params.kv_unified = False
        self.vocab = llama.llama_model_get_vocab(model)
        self.ctx = llama.llama_init_from_model(model, params)
        assert self.ctx

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = (llama.llama_token * 256)()
        count = llama.llama_tokenize(self.vocab, data, len(data), out, 256, True, True)
        return list(out[:count])

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One batch: (token, position, sequence, logits wanted) each."""
        batch = llama.llama_batch_init(len(items), 0, 1)
        for i, (token, position, sequence, wanted) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, wanted
            batch.seq_id[i][0] = sequence
        batch.n_tokens = len(items)
        try:
            assert llama.llama_decode(self.ctx, batch) == 0
        finally:
            llama.llama_batch_free(batch)

    def logits(self, row: int) -> np.ndarray[Any, Any]:
        size = llama.llama_vocab_n_tokens(self.vocab)
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, row), shape=(size,)).copy()

    def prompt(self, tokens: list[int], sequence: int) -> list[tuple[int, int, int, bool]]:
        return [(t, i, sequence, i == len(tokens) - 1) for i, t in enumerate(tokens)]

    def close(self) -> None:
        llama.llama_free(self.ctx)


def alone(model: Any, text: str) -> list[np.ndarray[Any, Any]]:
    """Greedy steps of one sequence in its own context: the logits before each step."""
    context = Context(model, 1)
    tokens = context.tokenize(text)
    context.decode(context.prompt(tokens, 0))
    rows = [context.logits(len(tokens) - 1)]
    for step in range(STEPS - 1):
        context.decode([(int(rows[-1].argmax()), len(tokens) + step, 0, True)])
        rows.append(context.logits(0))
    context.close()
    return rows


def test_sequences_decoded_together_give_the_logits_each_gives_alone(model: Any) -> None:
    reference = [alone(model, text) for text in PROMPTS]
    context = Context(model, len(PROMPTS))
    prompts = [context.tokenize(text) for text in PROMPTS]
    current = []
    for sequence, tokens in enumerate(prompts):
        context.decode(context.prompt(tokens, sequence))
        current.append(context.logits(len(tokens) - 1))
    together: list[list[np.ndarray[Any, Any]]] = [[] for _ in PROMPTS]
    for step in range(STEPS):
        for sequence in range(len(PROMPTS)):
            together[sequence].append(current[sequence])
        if step == STEPS - 1:
            break
        context.decode([(int(current[s].argmax()), len(prompts[s]) + step, s, True) for s in range(len(PROMPTS))])
        current = [context.logits(s) for s in range(len(PROMPTS))]
    context.close()
    for sequence in range(len(PROMPTS)):
        for step in range(STEPS):
            assert np.array_equal(reference[sequence][step], together[sequence][step]), (sequence, step)


def test_another_sequences_prompt_in_the_same_batch_changes_nothing(model: Any) -> None:
    reference = alone(model, PROMPTS[0])
    context = Context(model, 2)
    mine, other = context.tokenize(PROMPTS[0]), context.tokenize(" ".join(PROMPTS) * 4)
    context.decode(context.prompt(mine, 0))
    rows = [context.logits(len(mine) - 1)]
    for step in range(STEPS - 1):
        items = [(int(rows[-1].argmax()), len(mine) + step, 0, True)]
        if step == 3:  # a long prompt of sequence 1 joins this step's batch
            items += [(t, i, 1, False) for i, t in enumerate(other)]
        context.decode(items)
        rows.append(context.logits(0))
    context.close()
    assert all(np.array_equal(a, b) for a, b in zip(reference, rows, strict=True))


Stream = list[tuple[int, float]]


async def generate(engine: LlamaCppEngine, prompt: Sequence[int], sampling: Sampling) -> Stream:
    return [(token.token_id, token.logprob) async for token in engine.generate(prompt, sampling)]


# A long greedy stream, a short sampled one (it ends first, leaving the middle sequence idle
# between two generating ones), a long sampled one.
SAMPLINGS = [
    Sampling(max_new_tokens=40),
    Sampling(max_new_tokens=6, temperature=0.7, seed=10),
    Sampling(max_new_tokens=40, temperature=0.7, seed=9),
]


@pytest.fixture(scope="module")
def alone_engine() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(default_model_path(), MODEL, slots=1, context_length=256)
    yield engine
    asyncio.run(engine.close())


async def test_running_streams_share_each_pass_over_the_weights_and_give_what_each_gives_alone(
    alone_engine: LlamaCppEngine,
) -> None:
    engine = LlamaCppEngine(default_model_path(), MODEL, slots=3, context_length=256, count_passes=True)
    try:
        # The third prompt is 132 tokens, 11 chunks: most are evaluated while the others generate.
        prompts = [engine.tokenize(text) for text in (*PROMPTS[:2], " ".join(PROMPTS) * 6)]
        reference = [await generate(alone_engine, p, s) for p, s in zip(prompts, SAMPLINGS, strict=True)]
        assert [len(stream) for stream in reference] == [40, 6, 40], "no stream ends early, so all overlap"
        engine.passes.clear()
        together = await asyncio.gather(*(generate(engine, p, s) for p, s in zip(prompts, SAMPLINGS, strict=True)))
        assert together == reference
        # Each prompt chunk of several tokens is a pass of its own; one-token batches (generated
        # tokens, a last chunk of one token) of all streams share one pass per step.
        chunks = [[len(b) for b in Evaluation(tuple(p)).batches(0)] for p in prompts]
        steps = max(len(c) + len(stream) for c, stream in zip(chunks, reference, strict=True))
        assert sum(size > 1 for c in chunks for size in c) + steps >= len(engine.passes), engine.passes
        assert max(engine.passes) >= 3, "three streams' tokens in one pass"
    finally:
        await engine.close()


async def test_a_stream_closed_early_frees_its_sequence_for_the_next(alone_engine: LlamaCppEngine) -> None:
    engine = LlamaCppEngine(default_model_path(), MODEL, slots=2, context_length=256)
    try:
        prompts = [engine.tokenize(text) for text in PROMPTS]
        expected = [await generate(alone_engine, prompts[i], SAMPLINGS[i]) for i in (0, 2)]
        first = asyncio.create_task(generate(engine, prompts[0], SAMPLINGS[0]))
        closed = engine.generate(prompts[1], SAMPLINGS[2])
        assert [await anext(closed) for _ in range(3)]
        await closed.aclose()  # a client gone mid-stream
        # Both sequences are taken until the closed one is freed; the next waits for it.
        assert await asyncio.wait_for(generate(engine, prompts[2], SAMPLINGS[2]), 60) == expected[1]
        assert await first == expected[0]
    finally:
        await engine.close()


async def test_a_stream_that_outgrows_its_context_fails_alone(alone_engine: LlamaCppEngine) -> None:
    engine = LlamaCppEngine(default_model_path(), MODEL, slots=2, context_length=64)
    try:
        short = engine.tokenize(PROMPTS[0])
        room = engine.identity.context_length  # llama.cpp may round the asked 64 up
        long = engine.tokenize(" ".join(PROMPTS) * 40)[: room - 4]
        expected = await generate(alone_engine, short, Sampling(max_new_tokens=20))
        outgrowing = generate(engine, long, Sampling(max_new_tokens=20))
        staying = generate(engine, short, Sampling(max_new_tokens=20))
        failed, served = await asyncio.gather(outgrowing, staying, return_exceptions=True)
        assert isinstance(failed, ValueError) and f"{room}-token context" in str(failed)
        assert served == expected
    finally:
        await engine.close()


async def test_a_closed_engine_refuses_work_and_closes_once() -> None:
    """A node that stops twice (a failed start, then its shutdown) closes its engine twice: the
    second close is a no-op, not a double free of llama.cpp's context."""
    engine = LlamaCppEngine(default_model_path(), MODEL, slots=1, context_length=64)
    await engine.close()
    await engine.close()
    with pytest.raises(EngineUnavailable, match="closed"):
        await generate(engine, [1, 2, 3], Sampling(max_new_tokens=2))
