"""What privacy costs: the same requests through 0, 1, 3 and 5 onion relays, and through
llama.cpp's own server (`python -m llama_cpp.server`, the single-node peer), in one run.

A real local swarm (separate processes on loopback: 5 relays, one inference node with the
embedded SmolLM2 model, two routers: one keeping circuits ready before requests come, the
default, and one building each request's circuit when it comes, for "3 hops, no pool") and the
llama.cpp server on the same GGUF file and threads.
For each prompt every configuration runs once, in rotating order, so drift hits all alike; the
figures are medians, and the hop costs are medians of per-prompt ratios against 0 hops.

Targets (issue #4): 3 hops add at most 3% to time to first token over 0 hops, and cost at most
1% of decode throughput. Writes bench/results/privacy.json and privacy.png. Run: `make bench`.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llama_server import start_llama_server  # noqa: E402
from services.inference.models import DEFAULT_MODEL_NAME  # noqa: E402
from swarmserve.client import generate  # noqa: E402
from swarmserve.swarm import LocalSwarm, free_port_block  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HOPS = [0, 1, 3, 5]
NEW_TOKENS = 64
ROUNDS = 3
NO_POOL = "3 hops, no pool"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe the water cycle to a child.",
    "Give me advice for learning to cook.",
]
CORES = os.cpu_count() or 1
# All cores to llama.cpp (relays, router and client then compete with its decode threads on
# this one machine), and one core left for them.
THREAD_CONFIGS = sorted({CORES, max(1, CORES - 1)}, reverse=True)


def llama_server_run(port: int, prompt: str) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, tokens) streaming a chat completion."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
            "stream": True,
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    first = last = started
    count = 0
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                last = time.perf_counter()
                count += 1
                if count == 1:
                    first = last
    return first - started, (count - 1) / (last - first) if count > 1 else 0.0, count


async def swarm_run(router: str, prompt: str, hops: int) -> tuple[float, float, int]:
    result = await generate(router, prompt, model=DEFAULT_MODEL_NAME, hops=hops, max_tokens=NEW_TOKENS)
    return result.time_to_first_token_s, result.tokens_per_second, len(result.token_ids)


async def measure(console: Console, threads: int) -> dict[str, Any]:
    configs = [*(f"{h} hops" for h in HOPS), NO_POOL, "llama_cpp.server"]
    samples: dict[str, list[tuple[float, float, int]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as workdir:
        base = free_port_block(2 + max(HOPS) + 1 + 1)
        models = f"[{{name: {DEFAULT_MODEL_NAME}, threads: {threads}}}]"
        swarm = LocalSwarm(
            Path(workdir),
            ports_from=base,
            relays=max(HOPS),
            inference_nodes=1,
            inference_env={"SWARMSERVE_MODELS": models},
            routers=2,
            node_env={"router-2": {"SWARMSERVE_CIRCUIT_POOL__ENABLED": "false"}},
            ledger=False,
        )
        unpooled = swarm.routers[1].listen
        server_port = base + max(HOPS) + 3
        await swarm.start()
        server = start_llama_server(server_port, threads)
        try:
            for hops in HOPS:  # warm every path once
                await swarm_run(swarm.router, PROMPTS[0], hops)
            await swarm_run(unpooled, PROMPTS[0], 3)
            await asyncio.to_thread(llama_server_run, server_port, PROMPTS[0])
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task(f"{threads} llama.cpp threads", total=ROUNDS * len(PROMPTS) * len(configs))
                for round_ in range(ROUNDS):
                    for index, prompt in enumerate(PROMPTS):
                        shift = (round_ + index) % len(configs)
                        for config in configs[shift:] + configs[:shift]:
                            if config == "llama_cpp.server":
                                sample = await asyncio.to_thread(llama_server_run, server_port, prompt)
                            elif config == NO_POOL:
                                sample = await swarm_run(unpooled, prompt, 3)
                            else:
                                sample = await swarm_run(swarm.router, prompt, int(config.split()[0]))
                            samples[config].append(sample)
                            progress.advance(task)
        finally:
            server.terminate()
            server.wait(timeout=30)
            await swarm.stop()

    def median(config: str, field: int) -> float:
        return statistics.median(s[field] for s in samples[config])

    figures: dict[str, Any] = {
        config: {
            "ttft_ms_median": median(config, 0) * 1000,
            "decode_tokens_per_s_median": median(config, 1),
            "tokens_mean": statistics.mean(s[2] for s in samples[config]),
        }
        for config in configs
    }
    for config in [*(f"{h} hops" for h in HOPS[1:]), NO_POOL]:
        pairs = list(zip(samples["0 hops"], samples[config], strict=True))
        entry = figures[config]
        entry["ttft_added_pct_vs_0_hops"] = round(statistics.median((h[0] / d[0] - 1) * 100 for d, h in pairs), 2)
        entry["ttft_added_ms_vs_0_hops"] = round(statistics.median((h[0] - d[0]) * 1000 for d, h in pairs), 2)
        entry["decode_cost_pct_vs_0_hops"] = round(statistics.median((1 - h[1] / d[1]) * 100 for d, h in pairs), 2)
    three = figures["3 hops"]
    figures["llama_threads"] = threads
    figures["meets_targets"] = {
        "ttft": three["ttft_added_pct_vs_0_hops"] <= 3,
        "decode": three["decode_cost_pct_vs_0_hops"] <= 1,
    }
    return figures


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [*(f"{h} hops" for h in HOPS), NO_POOL, "llama_cpp.server"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runs)
    for offset, run in enumerate(runs):
        xs = [i + offset * width for i in range(len(configs))]
        label = f"llama.cpp threads: {run['llama_threads']}"
        left.bar(xs, [run[c]["ttft_ms_median"] for c in configs], width, label=label)
        right.bar(xs, [run[c]["decode_tokens_per_s_median"] for c in configs], width, label=label)
    for axis, label in ((left, "time to first token, median (ms)"), (right, "decode tokens/s, median")):
        axis.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(configs))], configs, rotation=15)
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle("Onion hops vs llama.cpp's own server: same model, same run (SmolLM2-135M Q4_1, one 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    console = Console(stderr=True)
    console.print(
        f"[bold]bench/privacy.py[/]: {HOPS} hops and llama_cpp.server, greedy, {NEW_TOKENS} tokens, "
        f"llama.cpp threads {THREAD_CONFIGS} on {CORES} cores"
    )
    runs = [asyncio.run(measure(console, threads)) for threads in THREAD_CONFIGS]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "privacy",
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp, embedded)",
        "machine": {"platform": platform.platform(), "cpus": CORES},
        "rounds": ROUNDS,
        "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "targets": {"3 hops ttft_added_pct_vs_0_hops": "<= 3", "3 hops decode_cost_pct_vs_0_hops": "<= 1"},
        "runs": runs,
    }
    (RESULTS / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, RESULTS / "privacy.png")
    table = Table("threads", "path", "TTFT (ms)", "decode tok/s", "TTFT vs 0 hops", "decode cost")
    for run in runs:
        for config, entry in run.items():
            if not isinstance(entry, dict) or "ttft_ms_median" not in entry:
                continue
            added = entry.get("ttft_added_pct_vs_0_hops")
            table.add_row(
                str(run["llama_threads"]),
                config,
                f"{entry['ttft_ms_median']:.1f}",
                f"{entry['decode_tokens_per_s_median']:.1f}",
                f"+{entry['ttft_added_ms_vs_0_hops']} ms ({added}%)" if added is not None else "",
                f"{entry['decode_cost_pct_vs_0_hops']}%" if "decode_cost_pct_vs_0_hops" in entry else "",
            )
    console.print(table)
    console.print("targets for 3 hops: TTFT +3% at most, decode cost 1% at most")
    console.print(f"wrote {RESULTS / 'privacy.json'} and {RESULTS / 'privacy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
