"""Tokens to the router's client in shared messages under backlog, alone and at once without
(``services/router/servicer.py``: ``ready_batches``, ``token_chunk``), alone; the whole path is
covered by every router test that streams (their clients read chunks of any size).

Tried: a stream whose events come slower than they are read (each alone, none waiting); a
reader slower than the stream (what came meanwhile shares one batch, in order); an error after
some events (they come first, then the error); a reader that stops (the stream is closed, its
cleanup runs); consecutive tokens merged into one chunk that a client reads as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from services.router.service import TokenDelta
from services.router.servicer import ready_batches, token_chunk


async def ticking(count: int, every_s: float, closed: list[bool] | None = None) -> AsyncGenerator[int, None]:
    try:
        for i in range(count):
            await asyncio.sleep(every_s)
            yield i
    finally:
        if closed is not None:
            closed.append(True)


async def test_an_idle_stream_sends_each_event_alone_and_at_once() -> None:
    loop = asyncio.get_running_loop()
    started, seen = loop.time(), []
    async for batch in ready_batches(ticking(5, 0.02)):
        seen.append((batch, round(loop.time() - started, 2)))
    assert [b for b, _ in seen] == [[0], [1], [2], [3], [4]]
    assert seen[0][1] < 0.05, "the first event waited"


async def test_a_slow_reader_gets_what_came_meanwhile_in_one_batch() -> None:
    batches = []
    async for batch in ready_batches(ticking(20, 0.005)):
        batches.append(batch)
        await asyncio.sleep(0.03)  # the client's message takes this long to send
    assert [e for b in batches for e in b] == list(range(20))
    assert len(batches) < 10 and max(len(b) for b in batches) > 2


async def test_an_error_comes_after_the_events_before_it() -> None:
    async def failing() -> AsyncGenerator[int, None]:
        yield 1
        yield 2
        raise ValueError("the node went away")

    seen = []
    with pytest.raises(ValueError, match="went away"):
        async for batch in ready_batches(failing()):
            seen += batch
            await asyncio.sleep(0.01)
    assert seen == [1, 2]


async def test_a_reader_that_stops_closes_the_stream() -> None:
    closed: list[bool] = []
    batches = ready_batches(ticking(1000, 0.001, closed))
    async for _ in batches:
        break
    await batches.aclose()
    assert closed == [True]


def test_consecutive_tokens_make_one_chunk() -> None:
    deltas = [TokenDelta("Par", 10, b"Par", 4, -0.5), TokenDelta("is", 11, b"is", 5, -0.25)]
    chunk = token_chunk(deltas)
    assert (chunk.text, list(chunk.token_ids), chunk.index) == ("Paris", [10, 11], 4)
    assert list(chunk.token_texts) == [b"Par", b"is"] and list(chunk.logprobs) == [-0.5, -0.25]
