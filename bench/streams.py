"""Streams that survive, measured: what a resumption costs the client (the gap it sees when the
serving node is killed mid-answer), and what multipath costs against one path (time to first
token, decode tokens/s, bytes on the wire), in one run on one local swarm.

A real swarm (processes on loopback: 8 relays, 3 inference nodes with the embedded SmolLM2
model, one router). Resumption: ROUNDS answers of 64 tokens, the serving node SIGKILLed after
16 tokens and restarted afterwards; the gap is the longest pause between two tokens of that
answer, set against the median pause between tokens of the same answer (the baseline of the same
run). Multipath: for each prompt, one path and paths 4 / threshold 3, each with 1 and 2 relays per
path, in rotating order; bytes on the wire are the relays' forwarded payload bytes (both
directions, from their /metrics) per answer. Figures are medians with 95% bootstrap intervals;
ratios are per-prompt ratios against one path. Writes bench/results/streams.json and
streams.png. Run: `make bench` (or `python bench/streams.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from grpc import aio
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.privacy import PROMPTS  # noqa: E402  (the same prompts as the hop benchmark)
from services.inference.models import DEFAULT_MODEL_NAME  # noqa: E402
from swarmserve.client import check_summary  # noqa: E402
from swarmserve.swarm import LocalSwarm, free_port_block  # noqa: E402
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NEW_TOKENS = 64
KILL_AT = 16
ROUNDS = 6
CONFIGS = [(1, 1, 1), (4, 3, 1), (1, 1, 2), (4, 3, 2)]  # (paths, threshold, relays per path)
GOSSIP = {"SWARMSERVE_GOSSIP__PROBE_INTERVAL_S": "0.2", "SWARMSERVE_GOSSIP__PROBE_TIMEOUT_S": "0.1"}


def interval(values: list[float], rounds: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]


def summary_of(values: list[float]) -> dict[str, float]:
    low, high = interval(values)
    return {"median": statistics.median(values), "ci95_low": low, "ci95_high": high, "n": len(values)}


def wire_bytes(swarm: LocalSwarm) -> float:
    total = 0.0
    for relay in swarm.relays:
        try:
            with urllib.request.urlopen(f"http://{swarm.metrics[relay.name]}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            continue  # a relay restarting
        total += sum(float(v) for v in re.findall(r"swarmserve_relay_forwarded_bytes_total\{[^}]*\} ([0-9.e+]+)", text))
    return total


async def answer(
    router: str, prompt: str, paths: int, threshold: int, hops: int, on_token: Any = None
) -> tuple[list[float], router_pb2.GenerateSummary, list[int]]:
    """Arrival times of the tokens, the summary (its receipts checked) and the token ids."""
    sampling = common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, seed=1)
    request = router_pb2.GenerateRequest(model=DEFAULT_MODEL_NAME, sampling=sampling)
    request.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=prompt)
    request.privacy.hops, request.privacy.paths, request.privacy.threshold = hops, paths, threshold
    arrivals: list[float] = [time.perf_counter()]
    ids: list[int] = []
    texts: list[bytes] = []
    summary = None
    async with aio.insecure_channel(router) as channel:
        async for reply in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=300):
            if reply.HasField("summary"):
                summary = reply.summary
                continue
            if reply.token.token_ids:
                arrivals.append(time.perf_counter())
                ids.extend(reply.token.token_ids)
                texts.extend(reply.token.token_texts)
                if on_token is not None:
                    await on_token(len(ids))
    assert summary is not None
    check_summary(summary, ids, texts, sampling)
    return arrivals, summary, ids


async def resumptions(console: Console, swarm: LocalSwarm) -> dict[str, Any]:
    gaps, baselines, ratios = [], [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("resumptions (serving node killed)", total=ROUNDS)
        for round_ in range(ROUNDS):
            prompt = PROMPTS[round_ % len(PROMPTS)]
            reference = (await answer(swarm.router, prompt, 1, 1, 3))[2]
            killed: list[str] = []

            async def kill(count: int, killed: list[str] = killed) -> None:
                if count == KILL_AT and not killed:
                    killed.append(await swarm.generating())
                    swarm.signal(killed[0], signal.SIGKILL)

            arrivals, summary, ids = await answer(swarm.router, prompt, 1, 1, 3, kill)
            assert ids == reference and len(summary.earlier_segments) == 1, "resumed, no token lost or repeated"
            pauses = [b - a for a, b in itertools.pairwise(arrivals[1:])]
            gap, baseline = max(pauses), statistics.median(pauses)
            gaps.append(gap * 1000)
            baselines.append(baseline * 1000)
            ratios.append(gap / baseline)
            swarm.restart(killed[0])
            await swarm.wait_until_seen(swarm.router, len(swarm.relays) + len(swarm.inference), timeout_s=120)
            progress.advance(task)
    return {
        "gap_ms": summary_of(gaps),
        "inter_token_ms_same_answers": summary_of(baselines),
        "gap_over_inter_token": summary_of(ratios),
        "tokens_lost_or_repeated": 0,
    }


async def multipath(console: Console, swarm: LocalSwarm) -> dict[str, Any]:
    samples: dict[tuple[int, int, int], list[tuple[float, float, float]]] = {c: [] for c in CONFIGS}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("multipath vs one path", total=ROUNDS * len(PROMPTS) * len(CONFIGS))
        for round_ in range(ROUNDS):
            for index, prompt in enumerate(PROMPTS):
                shift = (round_ + index) % len(CONFIGS)
                for config in CONFIGS[shift:] + CONFIGS[:shift]:
                    before = wire_bytes(swarm)
                    arrivals, _, ids = await answer(swarm.router, prompt, *config)
                    wire = wire_bytes(swarm) - before
                    ttft = arrivals[1] - arrivals[0]
                    decode = (len(ids) - 1) / (arrivals[-1] - arrivals[1]) if len(ids) > 1 else 0.0
                    samples[config].append((ttft * 1000, decode, wire))
                    progress.advance(task)
    figures: dict[str, Any] = {}
    for paths, threshold, hops in CONFIGS:
        mine = samples[(paths, threshold, hops)]
        base = samples[(1, 1, hops)]
        entry: dict[str, Any] = {
            "ttft_ms": summary_of([s[0] for s in mine]),
            "decode_tokens_per_s": summary_of([s[1] for s in mine]),
            "wire_bytes_per_answer": summary_of([s[2] for s in mine]),
        }
        if paths > 1:
            pairs = list(zip(base, mine, strict=True))
            entry["ttft_ratio_vs_one_path"] = summary_of([m[0] / b[0] for b, m in pairs])
            entry["decode_ratio_vs_one_path"] = summary_of([m[1] / b[1] for b, m in pairs])
            entry["wire_ratio_vs_one_path"] = summary_of([m[2] / b[2] for b, m in pairs])
        figures[f"paths {paths}/{threshold}, {hops} relay(s) each"] = entry
    return figures


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = report["multipath"]
    names = list(figures)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, key, label in zip(
        axes,
        ["ttft_ms", "decode_tokens_per_s", "wire_bytes_per_answer"],
        ["time to first token (ms)", "decode tokens/s", "relay bytes per answer"],
        strict=True,
    ):
        medians = [figures[n][key]["median"] for n in names]
        errors = [
            [m - figures[n][key]["ci95_low"] for n, m in zip(names, medians, strict=True)],
            [figures[n][key]["ci95_high"] - m for n, m in zip(names, medians, strict=True)],
        ]
        axis.bar(range(len(names)), medians, yerr=errors, capsize=4)
        axis.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
        axis.set_ylabel(label)
    gap = report["resumption"]["gap_ms"]
    fig.suptitle(
        f"Multipath (S-IDA 4/3) vs one path, medians with 95% intervals; a resumption's gap: "
        f"{gap['median']:.0f} ms [{gap['ci95_low']:.0f}, {gap['ci95_high']:.0f}]"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def measure(console: Console) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        env = {f"relay-{i + 1}": GOSSIP for i in range(8)} | {f"inference-{i + 1}": GOSSIP for i in range(3)}
        swarm = LocalSwarm(
            Path(workdir), ports_from=free_port_block(100), relays=8, inference_nodes=3, node_env=env, ledger=False
        )
        await swarm.start()
        try:
            for config in CONFIGS:  # warm every kind of path once
                await answer(swarm.router, PROMPTS[0], *config)
            return {"resumption": await resumptions(console, swarm), "multipath": await multipath(console, swarm)}
        finally:
            await swarm.stop()


def main() -> int:
    console = Console(stderr=True)
    console.print(f"[bold]bench/streams.py[/]: resumption gap and multipath cost, {NEW_TOKENS} greedy tokens")
    report = {
        "benchmark": "streams",
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp, embedded)",
        "machine": {"platform": platform.platform()},
        "rounds": ROUNDS,
        "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "kill_at_token": KILL_AT,
        **asyncio.run(measure(console)),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streams.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "streams.png")
    table = Table("configuration", "TTFT ms", "decode tok/s", "bytes/answer", "TTFT x", "decode x", "bytes x")
    for name, entry in report["multipath"].items():

        def cell(key: str, entry: dict[str, Any] = entry) -> str:
            if key not in entry:
                return "-"
            value = entry[key]
            return f"{value['median']:.2f} [{value['ci95_low']:.2f}, {value['ci95_high']:.2f}]"

        table.add_row(
            name,
            cell("ttft_ms"),
            cell("decode_tokens_per_s"),
            cell("wire_bytes_per_answer"),
            cell("ttft_ratio_vs_one_path"),
            cell("decode_ratio_vs_one_path"),
            cell("wire_ratio_vs_one_path"),
        )
    console.print(table)
    gap = report["resumption"]
    console.print(
        f"resumption gap {gap['gap_ms']['median']:.0f} ms [{gap['gap_ms']['ci95_low']:.0f}, "
        f"{gap['gap_ms']['ci95_high']:.0f}] against {gap['inter_token_ms_same_answers']['median']:.1f} ms between "
        f"tokens of the same answers"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
