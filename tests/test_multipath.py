"""Multipath circuits (``PrivacyOptions.paths`` 4, ``threshold`` 3; S-IDA shares over disjoint
relays) with real processes, real sockets and the real SmolLM2 model.

Tried: an answer over four paths equals the one-path answer and its receipt checks; a relay of
the four killed (SIGKILL) mid-stream costs nothing (the stream goes on over three paths, not
resumed); two of the four killed leaves fewer than three paths, so the router resumes the stream
on a new set of four paths with no token lost or repeated; each of the four relays carried
traffic (disjoint paths); bad multipath options get clear errors.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from swarmserve.client import check_summary
from swarmserve.swarm import LocalSwarm
from swarmserve.v1 import router_pb2, router_pb2_grpc
from tests.test_failover import forwarded_bytes, process_swarm, request, stream


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[LocalSwarm]:
    async with process_swarm(tmp_path, relays=7) as swarm:  # four disjoint paths, and three more
        yield swarm


def multipath(max_new_tokens: int, paths: int = 4, threshold: int = 3, hops: int = 1) -> router_pb2.GenerateRequest:
    generate = request(max_new_tokens)
    generate.privacy.hops = hops
    generate.privacy.paths = paths
    generate.privacy.threshold = threshold
    return generate


async def test_four_paths_answer_as_one_and_one_relay_lost_costs_nothing(swarm: LocalSwarm) -> None:
    one_path = request(80)
    one_path.privacy.hops = 1
    reference, _, _ = await stream(swarm.router, one_path)
    before = forwarded_bytes(swarm)
    ids, texts, summary = await stream(swarm.router, multipath(80))
    assert ids == reference
    check_summary(summary, ids, texts)
    after = forwarded_bytes(swarm)
    carried = {name: after[name] - before[name] for name in after if after[name] > before[name]}
    assert len(carried) == 4, f"four disjoint paths of one relay each: {carried}"

    before = forwarded_bytes(swarm)
    killed: list[str] = []

    def kill_one_relay() -> None:
        now = forwarded_bytes(swarm)
        on_paths = sorted(name for name in now if now[name] > before[name])
        assert len(on_paths) == 4, on_paths
        killed.append(on_paths[0])
        swarm.signal(on_paths[0], signal.SIGKILL)

    ids, texts, summary = await stream(swarm.router, multipath(80), at_token=15, act=kill_one_relay)
    assert killed and ids == reference
    assert not summary.earlier_segments, "three paths of four still rebuild every message: no resumption"
    check_summary(summary, ids, texts)


async def test_two_relays_of_four_lost_the_stream_resumes_on_new_paths(swarm: LocalSwarm) -> None:
    reference, _, _ = await stream(swarm.router, multipath(80))
    before = forwarded_bytes(swarm)

    def kill_two_relays() -> None:
        now = forwarded_bytes(swarm)
        on_paths = sorted(name for name in now if now[name] > before[name])
        assert len(on_paths) == 4, on_paths
        for name in on_paths[:2]:
            swarm.signal(name, signal.SIGKILL)

    ids, texts, summary = await stream(swarm.router, multipath(80), at_token=15, act=kill_two_relays)
    assert ids == reference
    assert len(summary.earlier_segments) == 1, "fewer than three paths: resumed once on a new set"
    check_summary(summary, ids, texts)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"paths": 4, "threshold": 5}, "threshold 5 exceeds paths 4"),
        ({"paths": 40}, "exceeds this router's maximum"),
        ({"paths": 4, "hops": 0}, "at least one relay per path"),
        ({"paths": 4, "hops": 2}, "disjoint paths of 2 relays cannot be made"),
    ],
    ids=["threshold-above-paths", "too-many-paths", "no-relays", "too-few-relays"],
)
async def test_bad_multipath_options_get_clear_errors(swarm: LocalSwarm, options: dict[str, int], words: str) -> None:
    generate = request(8)
    for field, value in options.items():
        setattr(generate.privacy, field, value)
    with pytest.raises(aio.AioRpcError) as caught:
        async with aio.insecure_channel(swarm.router) as channel:
            async for _ in router_pb2_grpc.RouterStub(channel).Generate(generate, timeout=30):
                pass
    expected = grpc.StatusCode.UNAVAILABLE if "cannot be made" in words else grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.code() == expected and words in (caught.value.details() or ""), caught.value
