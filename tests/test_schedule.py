"""The reproducible-decoding schedule alone (services/inference/schedule.py): which batches
evaluate a stream and which cached positions may be kept. The property that makes decoding a
function of the request: whatever a context held, the positions it keeps were computed by the
very batches a cold evaluation of the new stream would use, and it evaluates the rest in those
batches. Tried with chunks that start where the cache ends instead of at fixed positions: the
property and the worked examples fail."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.inference.schedule import Evaluation, chunk_end, chunk_floor, reusable_positions


def spans(stream: Evaluation) -> list[tuple[int, int]]:
    """(start, end) of each batch of a cold evaluation."""
    result, start = [], 0
    for batch in stream.batches(0):
        result.append((start, start + len(batch)))
        start += len(batch)
    return result


def test_prompt_in_chunks_at_fixed_positions_then_each_generated_token_alone() -> None:
    stream = Evaluation(tuple(range(105)), (900, 901, 902))
    fine = [(start, start + 8) for start in range(0, 64, 8)]
    assert spans(stream) == [*fine, (64, 96), (96, 105), (105, 106), (106, 107), (107, 108)]
    assert sum(stream.batches(0), ()) == stream.tokens
    assert stream.last_batch_start == 107
    assert Evaluation(tuple(range(96))).last_batch_start == 64  # the whole last chunk, for its logits
    assert Evaluation(tuple(range(97))).last_batch_start == 96
    assert Evaluation(tuple(range(30))).last_batch_start == 24
    assert [chunk_end(p) for p in (0, 56, 64, 96)] == [8, 64, 96, 128]
    assert [chunk_floor(p) for p in (7, 8, 63, 64, 95, 130)] == [0, 8, 56, 64, 64, 128]


@pytest.mark.parametrize(
    ("cached", "wanted", "kept"),
    [
        # The same request again: everything but the last chunk.
        (Evaluation(tuple(range(70)), (1, 2, 3)), Evaluation(tuple(range(70))), 64),
        # Another chat with the same 25-token system prompt: its three whole chunks.
        (Evaluation((*range(25), 90, 91), (1,)), Evaluation((*range(25), 80, 81, 82)), 24),
        # A longer prompt sharing 90 tokens: the whole chunks, not the partial one after 64.
        (Evaluation(tuple(range(90)), (1, 2)), Evaluation(tuple(range(120))), 64),
        # A shorter prompt that the cached one extends: whole chunks of the shorter one only.
        (Evaluation(tuple(range(100))), Evaluation(tuple(range(70))), 64),
        # Prompts that part at token 43: up to the chunk boundary before it.
        (Evaluation(tuple(range(100))), Evaluation((*range(43), *range(500, 560))), 40),
        # A stream continued after 3 tokens where it was served (the cache holds 5 of them):
        # the prompt and the first 2, the last served token evaluated again for its logits.
        (Evaluation(tuple(range(70)), (7, 8, 9, 10, 11)), Evaluation(tuple(range(70)), (7, 8, 9)), 72),
        # ... and where only 1 of them was served before: up to the common token.
        (Evaluation(tuple(range(70)), (7,)), Evaluation(tuple(range(70)), (7, 8, 9)), 71),
        # The served tokens evaluated as a prompt elsewhere are not the served tokens.
        (Evaluation((*range(70), 7, 8, 9)), Evaluation(tuple(range(70)), (7, 8, 9)), 64),
        (None, Evaluation(tuple(range(70)), (7, 8, 9)), 0),
        (Evaluation(tuple(range(5))), Evaluation(tuple(range(5))), 0),
    ],
)
def test_worked_examples(cached: Evaluation | None, wanted: Evaluation, kept: int) -> None:
    assert reusable_positions(cached, wanted) == kept


tokens = st.lists(st.integers(0, 2), min_size=1, max_size=140).map(tuple)  # few ids: long common prefixes
streams = st.builds(Evaluation, tokens, st.lists(st.integers(0, 2), max_size=6).map(tuple))


@given(cached=st.none() | streams, wanted=streams)
def test_kept_positions_were_computed_by_the_batches_a_cold_evaluation_uses(
    cached: Evaluation | None, wanted: Evaluation
) -> None:
    keep = reusable_positions(cached, wanted)
    assert 0 <= keep <= wanted.last_batch_start
    cold = spans(wanted)
    assert keep in {start for start, _ in cold}
    if keep:
        assert cached is not None
        assert cached.tokens[:keep] == wanted.tokens[:keep]
        assert {span for span in cold if span[1] <= keep} <= set(spans(cached))
    # The rest is evaluated in exactly the cold evaluation's remaining batches.
    assert list(wanted.batches(keep)) == [wanted.tokens[start:end] for start, end in cold if start >= keep]


def test_bad_streams_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one prompt token"):
        Evaluation(())
    with pytest.raises(ValueError, match="inside a prompt chunk"):
        list(Evaluation(tuple(range(70))).batches(5))
