"""What batched decoding in the llama.cpp engine (issue 17) will rest on, checked on the pinned
llama.cpp and the embedded model: several sequences decoded together in one context, one batch
per step, give bit-identical logits to each decoded alone in its own context, as long as the KV
cache is kept per sequence (``kv_unified = False``), even when another sequence's whole prompt
rides in the same batch. (With one unified cache the logits moved by up to 1.6 and a greedy
answer diverged: attention then runs over every sequence's cells, masked, in other groupings.)
So "same request, same tokens" can hold with batching; if a llama.cpp upgrade breaks this, this
test says so before any engine relies on it.

Uses llama.cpp's C API through llama-cpp-python's bindings (the Llama class has no batch of
several sequences)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import llama_cpp as llama
import numpy as np
import pytest

from services.inference.models import default_model_path

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
