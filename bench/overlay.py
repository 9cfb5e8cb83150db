"""Overlay dispatch on a real swarm: every node its own process, gRPC over loopback, requests
through one-layer onion circuits, membership by gossip from one seed.

Swarm: 8 inference nodes running the emulated engine at 1x to 4x slowdown (2 batch slots each,
slow prefill so that a warm prefix cache matters), 8 routers as entry points (one beside each
node, as in WWW.Serve where every provider is also an entry point). Traffic: Poisson arrivals,
70% of them at two "hot" entry points that move half-way through each run; prompts are one of 16
shared system prefixes (Zipf s=1.1) plus a short question; answers of 16 to 48 tokens. A sweep of
request rates from light load to past saturation; a fresh swarm for every policy:

- overlay: ours (prefix affinity among acceptable load factors, from gossiped descriptors plus
  the router's own dispatches; busy nodes offload to peers with a free slot)
- local-only: each entry point serves on its own node only, no forwarding
- round-robin, random: the classic spreaders
- central-oracle: the same scoring as ours but reading every node's true state (Inference.Status
  on every node) at every decision

Per policy and rate: mean, P50 and P99 end-to-end latency, mean time to first token, SLO
attainment (deadline 0.5 s + 60 ms per requested token: three times a 1x node's decode time),
errors, and the share of requests offloaded. Ratios against each baseline are computed from the
same run. Writes bench/results/overlay.json and overlay.png. Run: `make bench` (about 11 min), or
`python bench/overlay.py --quick` for a 2-rate smoke run (prints, writes nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402

from bench.overlay_sim import versus_baselines  # noqa: E402
from swarmserve.swarm import LocalSwarm, free_port_block  # noqa: E402
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODEL = "emulated-overlay"
NODES = 8
SLOWDOWN = [1.0, 4.0, 1.5, 3.0, 2.0, 1.0, 4.0, 2.0]  # node i is SLOWDOWN[i] times slower than 1x
PREFILL_US, DECODE_US = 2_000, 20_000  # per token on a 1x node
SLOTS = 2
PREFIXES, PREFIX_WORDS = 16, 120
HOT_SHARE = 0.7
POLICIES = ["overlay", "local-only", "round-robin", "random", "central-oracle"]
RATES = [2.0, 4.0, 6.0, 8.0, 10.0]  # requests per second, whole swarm
SECONDS_PER_RATE = 20.0
SLO_BASE_S, SLO_PER_TOKEN_S = 0.5, 0.06


@dataclass
class Sample:
    latency_s: float
    ttft_s: float
    tokens: int
    deadline_s: float
    offloaded: bool
    error: str | None = None


def prompts(rng: random.Random) -> list[str]:
    words = [f"w{i}" for i in range(5000)]
    return [" ".join(rng.choice(words) for _ in range(PREFIX_WORDS)) for _ in range(PREFIXES)]


def zipf_choice(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights)[0]


def entry_for(rng: random.Random, elapsed_fraction: float) -> int:
    """70% of traffic at two hot entry points, which move half-way through the run."""
    hot = (0, 1) if elapsed_fraction < 0.5 else (4, 5)
    if rng.random() < HOT_SHARE:
        return rng.choice(hot)
    return rng.choice([i for i in range(NODES) if i not in hot])


async def one_request(router: str, channel: aio.Channel, prompt: str, tokens: int) -> Sample:
    request = router_pb2.GenerateRequest(
        model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(max_new_tokens=tokens)
    )
    deadline = SLO_BASE_S + SLO_PER_TOKEN_S * tokens
    started = time.monotonic()
    first: float | None = None
    try:
        async for reply in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120):
            if reply.HasField("token"):
                first = first or time.monotonic()
            else:
                summary = reply.summary
        end = time.monotonic()
        return Sample(
            end - started,
            (first or end) - started,
            summary.timing.completion_tokens,
            deadline,
            summary.served_by != summary.entered_at,
        )
    except aio.AioRpcError as error:
        end = time.monotonic()
        return Sample(end - started, end - started, 0, deadline, False, error.code().name)


async def drive(routers: list[str], rate: float, seconds: float, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    prefixes = prompts(random.Random(1))
    channels = [aio.insecure_channel(r) for r in routers]
    tasks: list[asyncio.Task[Sample]] = []
    started = time.monotonic()
    next_at = started
    try:
        while next_at - started < seconds:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            entry = entry_for(rng, (next_at - started) / seconds)
            prompt = f"{prefixes[zipf_choice(rng, PREFIXES)]} question {rng.randrange(10**6)} please answer"
            tokens = rng.randint(16, 48)
            tasks.append(asyncio.create_task(one_request(routers[entry], channels[entry], prompt, tokens)))
            next_at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))
    finally:
        for channel in channels:
            await channel.close()


def summarize(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    latencies = sorted(s.latency_s for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "mean_latency_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "p50_latency_s": round(latencies[len(latencies) // 2], 4) if latencies else None,
        "p99_latency_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 4)
        if latencies
        else None,
        "mean_ttft_s": round(statistics.fmean(s.ttft_s for s in ok), 4) if ok else None,
        # Failed requests miss their deadline.
        "slo_attainment": round(sum(1 for s in ok if s.latency_s <= s.deadline_s) / len(samples), 4),
        "offloaded_share": round(sum(s.offloaded for s in ok) / max(len(ok), 1), 4),
    }


def node_env() -> dict[str, dict[str, str]]:
    env = {}
    for i, slowdown in enumerate(SLOWDOWN):
        timing = f"{{prefill_us_per_token: {PREFILL_US * slowdown}, decode_us_per_token: {DECODE_US * slowdown}}}"
        env[f"inference-{i + 1}"] = {
            "SWARMSERVE_MODELS": f"[{{name: {MODEL}, engine: emulated, emulated: {timing}}}]",
            "SWARMSERVE_POLICY__MAX_CONCURRENT": str(SLOTS),
            "SWARMSERVE_POLICY__MAX_QUEUE": "512",
        }
    return env


async def run_policy(policy: str, rates: list[float], seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        base = free_port_block(2 * NODES)
        env = node_env()
        for i in range(NODES):
            env[f"router-{i + 1}"] = {
                "SWARMSERVE_DISPATCH": policy,
                "SWARMSERVE_DEFAULT_HOPS": "0",
                **({"SWARMSERVE_HOME": f"127.0.0.1:{base + NODES + i}"} if policy == "local-only" else {}),
            }
        swarm = LocalSwarm(
            Path(workdir), ports_from=base, relays=0, inference_nodes=NODES, routers=NODES, node_env=env, ledger=False
        )
        await swarm.start()
        try:
            routers = [r.listen for r in swarm.routers]
            await drive(routers, 3.0, 10.0, seed=99)  # warm-up: channels, circuits, latency histories
            results = {}
            for rate in rates:
                samples = await drive(routers, rate, seconds, seed=int(rate * 100))
                results[str(rate)] = summarize(samples)
                r = results[str(rate)]
                print(
                    f"  {policy:>14} @ {rate:4.1f} req/s: mean {r['mean_latency_s']} s, p99 {r['p99_latency_s']} s, "
                    f"SLO {r['slo_attainment']:.0%}, errors {r['errors']}, offloaded {r['offloaded_share']:.0%}",
                    flush=True,
                )
                await asyncio.sleep(2.0)  # let queues drain between rates
            return results
        finally:
            await swarm.stop()


def plot(sweep: dict[str, dict[str, dict[str, Any]]], rates: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for policy in POLICIES:
        rows = [sweep[policy][str(r)] for r in rates]
        axes[0].plot(rates, [r["mean_latency_s"] for r in rows], marker="o", label=policy)
        axes[1].plot(rates, [r["p99_latency_s"] for r in rows], marker="o", label=policy)
        axes[2].plot(rates, [r["slo_attainment"] for r in rows], marker="o", label=policy)
    for ax, title in zip(axes, ["mean end-to-end latency (s)", "P99 latency (s)", "SLO attainment"], strict=True):
        ax.set_title(title)
        ax.set_xlabel("offered load (requests/s, whole swarm)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"Real swarm on loopback: {NODES} emulated inference nodes (1x-4x), {NODES} routers, gossip")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rates, 10 s each (a smoke run)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=POLICIES, help="a subset, for tuning")
    args = parser.parse_args()
    rates, seconds = ([3.0, 8.0], 10.0) if args.quick else (RATES, SECONDS_PER_RATE)
    print(f"overlay benchmark: {len(args.policies)} policies x {len(rates)} rates x {seconds:.0f} s", flush=True)
    sweep = {}
    for policy in args.policies:
        started = time.monotonic()
        sweep[policy] = await run_policy(policy, rates, seconds)
        print(f"  {policy} done in {time.monotonic() - started:.0f} s", flush=True)
    if args.quick or args.policies != POLICIES:
        print(json.dumps(sweep, indent=2))
        return 0  # smoke and partial runs are for tuning: they write no results
    result = {
        "setup": {
            "nodes": NODES,
            "routers": NODES,
            "slowdown": SLOWDOWN,
            "slots": SLOTS,
            "prefill_us_per_token_1x": PREFILL_US,
            "decode_us_per_token_1x": DECODE_US,
            "prefixes": PREFIXES,
            "prefix_words": PREFIX_WORDS,
            "hot_share": HOT_SHARE,
            "seconds_per_rate": seconds,
            "slo": f"{SLO_BASE_S} s + {SLO_PER_TOKEN_S} s per requested token",
            "timing": "REAL processes and sockets; EMULATED engines (sleep-based, 1x-4x)",
        },
        "sweep": sweep,
        "overlay_vs_baselines": {
            str(rate): versus_baselines({p: sweep[p][str(rate)] for p in POLICIES}, POLICIES[1:]) for rate in rates
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overlay.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(sweep, rates, RESULTS / "overlay.png")
    print(json.dumps(result["overlay_vs_baselines"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
