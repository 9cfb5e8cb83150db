"""A third-party load generator against the swarm's OpenAI-compatible API: NVIDIA's AIPerf
(`aiperf profile`, from PyPI) against, in one run,

(a) the swarm through 3 onion relays (a router whose ``default_hops`` is 3),
(b) the swarm direct (a second router of the same swarm, ``default_hops`` 0),
(c) llama.cpp's own OpenAI-compatible server (``python -m llama_cpp.server``) on the same GGUF
    file with the same threads,

at several concurrency levels, streamed: request and output-token throughput, time to first
token and inter-token latency (P50, P99), errors. Each (target, concurrency) cell runs
``ROUNDS`` times in rotating target order, so the machine's drift hits all alike; the figures
are medians with their min-max range, and ratios against llama.cpp's server are of medians.

Why AIPerf: of the generators the issue names it is the one that installs on a CPU-only machine
without a GPU stack: guidellm depends on torch (on Linux, PyPI's torch pulls several GB of CUDA
libraries), ``vllm bench serve`` needs vLLM itself (CUDA wheels). AIPerf needs no GPU; its heavy
dependencies (transformers, datasets) are plain wheels. It lives in its own virtual environment,
``.venv-bench`` (``make bench-openai`` creates it), because it pins versions of libraries the
swarm also uses. It needs a Hugging Face tokenizer for its synthetic prompts:
``bench/gguf_tokenizer.py`` writes one from the embedded model's GGUF vocabulary (it tokenizes
as llama.cpp does), so nothing is downloaded from the Hub.

The swarm is a real local swarm (separate processes on loopback: 3 relays, one inference node
with the embedded SmolLM2 model and one slot, two routers, no ledger, as in bench/privacy.py).
Writes bench/results/openai_load.json and openai_load.png. Run: `make bench-openai` (part of
`make bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llama_server import start_llama_server  # noqa: E402
from services.inference.models import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402
from swarmserve.swarm import LocalSwarm, free_port_block  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BENCH_VENV = ROOT / ".venv-bench"
AIPERF = BENCH_VENV / "bin" / "aiperf"
TARGETS = ["swarm, 3 hops", "swarm, 0 hops", "llama_cpp.server"]
CONCURRENCY = [1, 2, 4]
INPUT_TOKENS = 64
OUTPUT_TOKENS = 32
CORES = os.cpu_count() or 1
THREADS = CORES  # llama.cpp decode threads, for both the swarm's node and llama.cpp's server
# The figures taken from AIPerf's export (profile_export_aiperf.json), with the statistics used.
FIGURES = {
    "time_to_first_token": ("p50", "p99"),
    "inter_token_latency": ("p50", "p99"),
    "request_latency": ("p50", "p99"),
    "request_throughput": ("avg",),
    "output_token_throughput": ("avg",),
    "output_sequence_length": ("avg",),  # answers end at the model's end token or max_tokens
}


def tokenizer_dir(workdir: Path) -> Path:
    """A Hugging Face tokenizer for the embedded model, read from its GGUF file."""
    out = workdir / "tokenizer"
    subprocess.run(
        [
            str(BENCH_VENV / "bin" / "python"),
            str(ROOT / "bench" / "gguf_tokenizer.py"),
            str(default_model_path()),
            str(out),
        ],
        check=True,
    )
    return out


def aiperf(url: str, concurrency: int, requests: int, tokenizer: Path, artifacts: Path, seed: int) -> dict[str, Any]:
    """One AIPerf profile; the figures of its JSON export."""
    command = [
        str(AIPERF), "profile", "--model", DEFAULT_MODEL_NAME, "--tokenizer", str(tokenizer), "--url", url,
        "--endpoint-type", "chat", "--streaming", "--concurrency", str(concurrency),
        "--request-count", str(requests), "--warmup-request-count", str(concurrency),
        "--synthetic-input-tokens-mean", str(INPUT_TOKENS), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(OUTPUT_TOKENS), "--output-tokens-stddev", "0",
        "--random-seed", str(seed), "--ui-type", "none",
        "--artifact-dir", str(artifacts),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    exports = list(artifacts.rglob("profile_export_aiperf.json"))
    if done.returncode != 0 or not exports:
        raise RuntimeError(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    export = json.loads(exports[0].read_text())
    metrics = export.get("records", export)
    figures: dict[str, Any] = {}
    for name, stats in FIGURES.items():
        entry = metrics.get(name) or {}
        for stat in stats:
            figures[f"{name}_{stat}"] = entry.get(stat)
        figures[f"{name}_unit"] = entry.get("unit")
    figures["errors"] = int((metrics.get("error_request_count") or {}).get("avg") or 0)
    count = (metrics.get("request_count") or {}).get("avg")
    figures["requests_completed"] = count
    return figures


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"rounds": len(samples), "errors": sum(s["errors"] for s in samples)}
    for key in samples[0]:
        if key.endswith("_unit"):
            summary[key] = samples[0][key]
            continue
        values = [s[key] for s in samples if isinstance(s.get(key), int | float)]
        if values and key != "errors":
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


async def measure(console: Console, rounds: int, requests_per_slot: int) -> dict[str, Any]:
    cells: dict[str, dict[int, list[dict[str, Any]]]] = {t: {c: [] for c in CONCURRENCY} for t in TARGETS}
    with tempfile.TemporaryDirectory() as work:
        workdir = Path(work)
        with console.status("converting the model's GGUF vocabulary into a tokenizer for AIPerf"):
            tokenizer = tokenizer_dir(workdir)
        base = free_port_block(2 + 3 + 1 + 1)
        swarm = LocalSwarm(
            workdir / "swarm",
            ports_from=base,
            relays=3,
            inference_nodes=1,
            routers=2,
            inference_env={
                "SWARMSERVE_MODELS": f"[{{name: {DEFAULT_MODEL_NAME}, threads: {THREADS}}}]",
                "SWARMSERVE_POLICY__MAX_QUEUE": str(4 * max(CONCURRENCY)),
            },
            node_env={"router-1": {"SWARMSERVE_DEFAULT_HOPS": "3"}, "router-2": {"SWARMSERVE_DEFAULT_HOPS": "0"}},
            ledger=False,
        )
        with console.status("starting a local swarm and llama_cpp.server"):
            await swarm.start()
            server_port = base + 6
            server = start_llama_server(server_port, THREADS)
        urls = {
            "swarm, 3 hops": f"http://{swarm.http['router-1']}",
            "swarm, 0 hops": f"http://{swarm.http['router-2']}",
            "llama_cpp.server": f"http://127.0.0.1:{server_port}",
        }
        try:
            with Progress(console=console) as progress:
                task = progress.add_task("aiperf runs", total=rounds * len(CONCURRENCY) * len(TARGETS))
                for round_ in range(rounds):
                    for level, concurrency in enumerate(CONCURRENCY):
                        shift = (round_ + level) % len(TARGETS)
                        for target in TARGETS[shift:] + TARGETS[:shift]:
                            progress.update(
                                task, description=f"round {round_ + 1}: {target}, concurrency {concurrency}"
                            )
                            artifacts = workdir / "aiperf" / f"{round_}-{concurrency}-{TARGETS.index(target)}"
                            sample = await asyncio.to_thread(
                                aiperf,
                                urls[target],
                                concurrency,
                                requests_per_slot * concurrency,
                                tokenizer,
                                artifacts,
                                round_ + 1,
                            )
                            cells[target][concurrency].append(sample)
                            progress.advance(task)
        finally:
            server.terminate()
            server.wait(timeout=30)
            await swarm.stop()
    figures: dict[str, Any] = {target: {str(c): summarize(cells[target][c]) for c in CONCURRENCY} for target in TARGETS}
    ratios: dict[str, Any] = {}
    for target in TARGETS[:2]:
        for c in CONCURRENCY:
            mine, theirs = figures[target][str(c)], figures["llama_cpp.server"][str(c)]
            ratios.setdefault(target, {})[str(c)] = {
                key: round(mine[key]["median"] / theirs[key]["median"], 3)
                for key in ("output_token_throughput_avg", "time_to_first_token_p50", "inter_token_latency_p50")
                if isinstance(mine.get(key), dict) and isinstance(theirs.get(key), dict) and theirs[key]["median"]
            }
    return {"figures": figures, "ratios_vs_llama_cpp_server": ratios}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("output_token_throughput_avg", "output tokens / s"),
        ("time_to_first_token_p50", "TTFT P50 (ms)"),
        ("inter_token_latency_p50", "inter-token latency P50 (ms)"),
        ("time_to_first_token_p99", "TTFT P99 (ms)"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, (key, title) in zip(axes, panels, strict=True):
        for target in TARGETS:
            cells = [result["figures"][target][str(c)].get(key) for c in CONCURRENCY]
            points = [(c, cell) for c, cell in zip(CONCURRENCY, cells, strict=True) if isinstance(cell, dict)]
            if not points:
                continue
            xs = [c for c, _ in points]
            medians = [cell["median"] for _, cell in points]
            low = [cell["median"] - cell["min"] for _, cell in points]
            high = [cell["max"] - cell["median"] for _, cell in points]
            axis.errorbar(xs, medians, yerr=[low, high], marker="o", capsize=3, label=target)
        axis.set_title(title)
        axis.set_xlabel("concurrency")
        axis.set_xticks(CONCURRENCY)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(
        f"AIPerf, streamed chat, {INPUT_TOKENS} in / {OUTPUT_TOKENS} out tokens, medians and min-max of "
        f"{result['rounds']} rounds ({result['machine']['cores']} cores)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-slot", type=int, default=8, help="requests per concurrent client per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=CONCURRENCY)
    args = parser.parse_args()
    CONCURRENCY[:] = args.concurrency
    console = Console()
    if not AIPERF.exists():
        console.print(f"[red]{AIPERF} is missing: run `make bench-openai`, which creates {BENCH_VENV.name}[/]")
        return 2
    console.print(
        f"[bold]bench/openai_load.py[/]: AIPerf against {', '.join(TARGETS)}; concurrency {CONCURRENCY}, "
        f"{args.rounds} rounds, {INPUT_TOKENS} in / {OUTPUT_TOKENS} out tokens"
    )
    started = time.monotonic()
    result = asyncio.run(measure(console, args.rounds, args.requests_per_slot))
    version = subprocess.run([str(AIPERF), "--version"], capture_output=True, text=True).stdout.strip()
    result |= {
        "generator": f"aiperf {version}".strip(),
        "rounds": args.rounds,
        "requests_per_slot": args.requests_per_slot,
        "input_tokens": INPUT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "concurrency": CONCURRENCY,
        "llama_threads": THREADS,
        "machine": {"cores": CORES, "python": platform.python_version(), "platform": platform.platform()},
        "seconds": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "openai_load.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "openai_load.png")
    table = Table(
        "target", "concurrency", "out tok/s", "TTFT P50 ms", "TTFT P99 ms", "ITL P50 ms", "ITL P99 ms", "errors"
    )
    for target in TARGETS:
        for c in CONCURRENCY:
            cell = result["figures"][target][str(c)]

            def show(key: str, cell: dict[str, Any] = cell) -> str:
                value = cell.get(key)
                return (
                    f"{value['median']:.1f} [{value['min']:.1f}, {value['max']:.1f}]"
                    if isinstance(value, dict)
                    else "-"
                )

            table.add_row(
                target,
                str(c),
                show("output_token_throughput_avg"),
                show("time_to_first_token_p50"),
                show("time_to_first_token_p99"),
                show("inter_token_latency_p50"),
                show("inter_token_latency_p99"),
                str(cell["errors"]),
            )
    console.print(table)
    console.print(f"ratios against llama_cpp.server (medians): {json.dumps(result['ratios_vs_llama_cpp_server'])}")
    console.print(f"wrote {RESULTS / 'openai_load.json'} and openai_load.png in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
