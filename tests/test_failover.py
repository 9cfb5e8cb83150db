"""Streams that survive: the node serving a stream, or a relay on its path, is killed with SIGKILL
mid-answer, and the router resumes the stream on another node from the tokens delivered (real
processes, real sockets, the real SmolLM2 model through llama.cpp).

What is tried, and what must hold each time:
- the serving node killed at token 30 of a 200-token greedy answer, and at a random token of a
  seeded T = 0.7 answer: the client's token ids equal those of an uninterrupted run (no token
  lost, none repeated), and the chained receipt checks at the client (two segments, the first
  signed by the killed node's last checkpoint, the second committing to the tokens before it);
- the middle relay, and the exit relay (found by the bytes each relay forwarded: every hop peels
  one layer, so the entry relay forwards the largest request cell and the exit relay the
  smallest), killed mid-stream: the same;
- a resumed stream's receipts tampered with (a segment dropped, reordered, the stream receipt of
  another stream): the client's check refuses each with a clear reason.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from grpc import aio

from swarmserve import native
from swarmserve.client import ReceiptError, check_summary
from swarmserve.receipts import verify_segments
from swarmserve.swarm import LocalSwarm, free_port_block
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.conftest import MODEL

PROMPT = "Write a long story about a lighthouse keeper and a storm."
GOSSIP = {
    "SWARMSERVE_GOSSIP__PROBE_INTERVAL_S": "0.2",
    "SWARMSERVE_GOSSIP__PROBE_TIMEOUT_S": "0.1",
    "SWARMSERVE_GOSSIP__SUSPICION_MULT": "3",
    "SWARMSERVE_GOSSIP__SYNC_INTERVAL_S": "2",
}
INFERENCE = {**GOSSIP, "SWARMSERVE_POLICY__MAX_NEW_TOKENS": "512"}
ROUTER = {**GOSSIP, "SWARMSERVE_DEFAULT_HOPS": "3", "SWARMSERVE_DUELS__RATE": "0"}


@asynccontextmanager
async def process_swarm(tmp_path: Path, relays: int) -> AsyncIterator[LocalSwarm]:
    """``relays`` relays, 2 inference nodes with the real model, 1 router: each a process."""
    env = {f"relay-{i + 1}": GOSSIP for i in range(relays)} | {f"inference-{i + 1}": INFERENCE for i in range(2)}
    swarm = LocalSwarm(
        tmp_path,
        ports_from=free_port_block(100),
        relays=relays,
        inference_nodes=2,
        node_env=env | {"router-1": ROUTER},
        ledger=False,
    )
    await swarm.start(timeout_s=120)
    try:
        yield swarm
    finally:
        await swarm.stop()


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[LocalSwarm]:
    async with process_swarm(tmp_path, relays=4) as swarm:  # a 3-hop path survives one killed
        yield swarm


def request(max_new_tokens: int, temperature: float = 0.0, seed: int = 7) -> router_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    generate = router_pb2.GenerateRequest(model=MODEL, sampling=sampling)
    generate.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=PROMPT)
    return generate


async def stream(
    router: str, generate: router_pb2.GenerateRequest, at_token: int | None = None, act: Callable[[], object] = list
) -> tuple[list[int], list[bytes], router_pb2.GenerateSummary]:
    """The stream's token ids, texts and summary; ``act`` runs once ``at_token`` tokens arrived."""
    ids: list[int] = []
    texts: list[bytes] = []
    summary = None
    async with aio.insecure_channel(router) as channel:
        async for reply in router_pb2_grpc.RouterStub(channel).Generate(generate, timeout=240):
            if reply.HasField("summary"):
                summary = reply.summary
                continue
            ids.extend(reply.token.token_ids)
            texts.extend(reply.token.token_texts)
            if len(ids) == at_token:
                result = act()
                if asyncio.iscoroutine(result):
                    await result
    assert summary is not None, "the stream ended without a summary"
    return ids, texts, summary


def forwarded_bytes(swarm: LocalSwarm) -> dict[str, float]:
    """Each relay's payload bytes passed on towards the exit, from its /metrics."""
    found = {}
    for relay in swarm.relays:
        with urllib.request.urlopen(f"http://{swarm.metrics[relay.name]}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        match = re.search(r'swarmserve_relay_forwarded_bytes_total\{direction="forward"\} ([0-9.e+]+)', text)
        found[relay.name] = float(match.group(1)) if match else 0.0
    return found


def check_resumed(
    summary: router_pb2.GenerateSummary, ids: list[int], texts: list[bytes], asked: router_pb2.GenerateRequest
) -> list[common_pb2.Receipt]:
    segments = check_summary(summary, ids, texts, asked.sampling)
    assert len(segments) == 2, "one resumption: two segments"
    assert segments[0].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED  # the killed node's checkpoint
    assert segments[1].prefix_tokens == segments[0].token_count > 0
    return segments


async def test_the_serving_node_killed_mid_answer_the_stream_goes_on_with_the_same_tokens(swarm: LocalSwarm) -> None:
    greedy = request(200)
    reference, _, whole = await stream(swarm.router, greedy)
    assert len(reference) == 200 and not whole.earlier_segments

    killed: list[str] = []

    async def kill_server() -> None:
        killed.append(await swarm.generating())
        swarm.signal(killed[0], signal.SIGKILL)

    ids, texts, summary = await stream(swarm.router, greedy, at_token=30, act=kill_server)
    assert ids == reference, "a resumed greedy stream equals the uninterrupted one"
    segments = check_resumed(summary, ids, texts, greedy)
    assert segments[0].token_count >= 30
    assert native.node_id(segments[0].node_key) == native.node_id(swarm.identity_key(killed[0]))
    assert summary.served_by != native.node_id(swarm.identity_key(killed[0]))

    # Seeded sampling at T = 0.7, the node killed at a random token: the same again.
    swarm.restart(killed[0])
    await swarm.wait_until_seen(swarm.router, 6, timeout_s=60)
    sampled = request(120, temperature=0.7, seed=20261203)
    reference, _, _ = await stream(swarm.router, sampled)
    killed.clear()
    at = random.Random(16).randrange(5, 100)
    ids, texts, summary = await stream(swarm.router, sampled, at_token=at, act=kill_server)
    assert ids == reference, f"a resumed seeded stream (cut at token {at}) equals the uninterrupted one"
    check_resumed(summary, ids, texts, sampled)


@pytest.mark.parametrize("position", ["middle", "exit"])
async def test_a_relay_killed_mid_answer_the_stream_goes_on_with_the_same_tokens(
    swarm: LocalSwarm, position: str
) -> None:
    greedy = request(120)
    reference, _, _ = await stream(swarm.router, greedy)
    before = forwarded_bytes(swarm)
    victim: list[str] = []

    def kill_relay() -> None:
        after = forwarded_bytes(swarm)
        on_path = sorted((after[name] - before[name], name) for name in after if after[name] > before[name])
        assert len(on_path) == 3, f"three relays carried the request: {on_path}"
        exit_relay, middle = on_path[0][1], on_path[1][1]  # fewest layers left: nearest the exit
        victim.append(middle if position == "middle" else exit_relay)
        swarm.signal(victim[0], signal.SIGKILL)

    ids, texts, summary = await stream(swarm.router, greedy, at_token=20, act=kill_relay)
    assert victim, "the relay was killed"
    assert ids == reference
    check_resumed(summary, ids, texts, greedy)


async def test_tampered_chains_are_refused_by_the_client(swarm: LocalSwarm) -> None:
    greedy = request(40)

    async def kill_server() -> None:
        swarm.signal(await swarm.generating(), signal.SIGKILL)

    ids, texts, summary = await stream(swarm.router, greedy, at_token=10, act=kill_server)
    check_resumed(summary, ids, texts, greedy)
    other_ids, other_texts, other = await stream(swarm.router, request(40, seed=8))

    def refused(changed: router_pb2.GenerateSummary, reason: str, shorter_by: int = 0) -> None:
        with pytest.raises(ReceiptError, match=reason):
            check_summary(changed, ids[: len(ids) - shorter_by], texts[: len(texts) - shorter_by], greedy.sampling)

    dropped = router_pb2.GenerateSummary()
    dropped.CopyFrom(summary)
    del dropped.earlier_segments[:]
    refused(dropped, "continues after")  # the first segment left out
    swapped = router_pb2.GenerateSummary()
    swapped.CopyFrom(summary)
    swapped.earlier_segments[0].CopyFrom(summary.receipt)
    swapped.receipt.CopyFrom(summary.earlier_segments[0])
    swapped.served_by = native.node_id(common_pb2.Receipt.FromString(summary.earlier_segments[0].receipt).node_key)
    refused(swapped, "continues after")  # segments in the wrong order
    foreign = router_pb2.GenerateSummary()
    foreign.CopyFrom(summary)
    foreign.stream_receipt.CopyFrom(other.stream_receipt)
    refused(foreign, "names other segments")  # another stream's receipt
    uncosigned = router_pb2.GenerateSummary()
    uncosigned.CopyFrom(summary)
    del uncosigned.earlier_segments[0].cosignatures[:]
    refused(uncosigned, "did not co-sign segment 0")
    refused(summary, "the stream has", shorter_by=1)  # a token withheld
    with pytest.raises(ReceiptError, match="segment 1"):  # a token changed in the second segment
        verify_segments([*summary.earlier_segments, summary.receipt], [*ids[:-1], ids[-1] ^ 1], texts)
    check_summary(other, other_ids, other_texts)  # the untouched other stream checks
