"""The WAN testbed (``bench/wan.py``) is what it says: every node in its own network namespace,
reached through its delay proxy, and the swarm serves across it. Tried: one stream through 1
relay with 25 ms one way on every link and no circuit pool. Its first token cannot come before
the client's round trip to the router, the set-up's round trip through relay and exit, and the
request's and first token's trip (10 one-way delays, 250 ms); it comes within a few more (with
the proxies' delay at 0 the same request takes about 20 ms). Skips where namespaces cannot be
made."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bench import wan
from swarmserve.client import generate
from swarmserve.swarm import LocalSwarm, free_port_block

DELAY_MS = 25.0

pytestmark = pytest.mark.skipif((reason := wan.unavailable()) is not None, reason=f"WAN testbed: {reason}")


async def test_delay_between_namespaced_nodes_is_on_every_link(tmp_path: Path) -> None:
    timing = "{prefill_us_per_token: 200, decode_us_per_token: 5000, batch_slowdown: 0}"
    inference = {"SWARMSERVE_MODELS": f"[{{name: {wan.MODEL}, engine: emulated, emulated: {timing}}}]"}
    no_pool = {"SWARMSERVE_CIRCUIT_POOL__ENABLED": "false", "SWARMSERVE_DUELS__RATE": "0"}
    with wan.testbed(DELAY_MS, 0.0, tmp_path) as bed:
        swarm = LocalSwarm(
            tmp_path / "swarm",
            ports_from=free_port_block(100),
            relays=1,
            inference_nodes=1,
            ledger=False,
            placement=bed.place,
            node_env={"inference-1": inference, "router-1": no_pool},
        )
        await swarm.start(timeout_s=120)
        try:
            assert all(n.address.startswith("10.") for n in [*swarm.routers, *swarm.relays, *swarm.inference])
            await generate(swarm.router, "warm", model=wan.MODEL, hops=1, max_tokens=2)  # channels connected
            started = time.monotonic()
            result = await generate(swarm.router, "across the WAN", model=wan.MODEL, hops=1, max_tokens=4)
            ttft_ms = result.time_to_first_token_s * 1000
            assert len(result.token_ids) == 4 and result.receipt is not None
            assert 10 * DELAY_MS <= ttft_ms < 10 * DELAY_MS + 250, ttft_ms
            assert time.monotonic() - started < 5
        finally:
            await swarm.stop()
        await asyncio.sleep(0)
