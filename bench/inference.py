"""The inference node over gRPC against llama.cpp called directly, same run, same model.

Both sides run SmolLM2-135M-Instruct Q4_1 (the embedded model) with the same threads, greedy
decoding, the same chat prompts and length; they alternate per prompt so drift hits both. The
node runs as its own process (`swarmserve inference`), as it would be deployed; the client is
this process. The difference is the cost of our service layer: gRPC, admission, per-token
log-probabilities, the receipt hash chain and signature, protobuf.

This machine's speed drifts from run to run (a shared VM), so each node run is paired with a
direct run of the same prompt right before or after it (the order alternates), and the figures
are medians of the paired ratios and differences.

Targets (issue #3): at most 3% lower decode throughput, at most 10 ms added to the first token.
Writes bench/results/inference.json. Run: `make bench`.
"""

from __future__ import annotations

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

import llama_cpp
from grpc import aio
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.inference.models import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CORES = os.cpu_count() or 1
# All cores for llama.cpp (the service layer and the client then compete with its decode
# threads), and one core left for them (how a node is meant to be deployed).
THREAD_CONFIGS = sorted({CORES, max(1, CORES - 1)}, reverse=True)
NEW_TOKENS = 64
ROUNDS = 6
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe the water cycle to a child.",
    "Give me advice for learning to cook.",
]


def direct_run(llama: llama_cpp.Llama, prompt_ids: list[int]) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, tokens) calling llama.cpp in-process."""
    started = time.perf_counter()
    first = last = started
    count = 0
    for token in llama.generate(prompt_ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
            break
        llama.detokenize([token])
        last = time.perf_counter()
        count += 1
        if count == 1:
            first = last
        if count == NEW_TOKENS:
            break
    return first - started, (count - 1) / (last - first) if count > 1 else 0.0, count


async def node_run(stub: inference_pb2_grpc.InferenceStub, prompt: str) -> tuple[float, float, int]:
    request = inference_pb2.InferenceGenerateRequest(
        model=DEFAULT_MODEL_NAME,
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=prompt)]),
        sampling=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS),
    )
    started = time.perf_counter()
    first = last = started
    count = 0
    async for reply in stub.Generate(request):
        if reply.HasField("token"):
            last = time.perf_counter()
            count += 1
            if count == 1:
                first = last
    return first - started, (count - 1) / (last - first) if count > 1 else 0.0, count


def start_node(workdir: Path, threads: int) -> tuple[subprocess.Popen[str], str]:
    config = workdir / "node.yaml"
    config.write_text(
        f"data_dir: {workdir / 'data'}\n"
        "log: {format: json}\n"
        f"models:\n  - name: {DEFAULT_MODEL_NAME}\n"
        f"    context_length: 2048\n    threads: {threads}\n"
        "policy: {max_concurrent: 1, max_queue: 4}\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmserve.cli",
            "inference",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("{") and json.loads(line)["event"] == "inference node ready":
            return process, str(json.loads(line)["address"])
    raise RuntimeError("the inference node did not start")


def summarize(samples: list[tuple[float, float, int]]) -> dict[str, float]:
    ttfts = [s[0] * 1000 for s in samples]
    rates = [s[1] for s in samples]
    return {
        "ttft_ms_mean": statistics.mean(ttfts),
        "ttft_ms_median": statistics.median(ttfts),
        "decode_tokens_per_s_mean": statistics.mean(rates),
        "decode_tokens_per_s_median": statistics.median(rates),
        "tokens_mean": statistics.mean(s[2] for s in samples),
    }


async def measure(console: Console, threads: int) -> dict[str, Any]:
    llama = llama_cpp.Llama(
        model_path=str(default_model_path()),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=llama.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    prompt_ids = {
        p: llama.tokenize(
            formatter(messages=[{"role": "user", "content": p}]).prompt.encode(),
            add_bos=True,
            special=True,
        )
        for p in PROMPTS
    }
    direct: list[tuple[float, float, int]] = []
    node: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory() as workdir:
        process, address = start_node(Path(workdir), threads)
        try:
            async with aio.insecure_channel(address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                direct_run(llama, prompt_ids[PROMPTS[0]])  # warm-up both
                await node_run(stub, PROMPTS[0])
                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task(f"node vs direct, {threads} threads", total=ROUNDS * len(PROMPTS))
                    for round_ in range(ROUNDS):
                        for prompt in PROMPTS:
                            if round_ % 2:
                                node.append(await node_run(stub, prompt))
                                direct.append(direct_run(llama, prompt_ids[prompt]))
                            else:
                                direct.append(direct_run(llama, prompt_ids[prompt]))
                                node.append(await node_run(stub, prompt))
                            progress.advance(task)
        finally:
            process.terminate()
            process.wait(timeout=30)
    ratios = [n[1] / d[1] for d, n in zip(direct, node, strict=True)]
    added = [(n[0] - d[0]) * 1000 for d, n in zip(direct, node, strict=True)]
    overhead = (1 - statistics.median(ratios)) * 100
    ttft_added = statistics.median(added)
    llama.close()
    return {
        "llama_threads": threads,
        "direct_llama_cpp": summarize(direct),
        "node_over_grpc": summarize(node),
        "paired_runs": len(ratios),
        "throughput_overhead_pct": round(overhead, 2),
        "throughput_overhead_pct_quartiles": [round((1 - q) * 100, 2) for q in statistics.quantiles(ratios, n=4)[::-1]],
        "ttft_added_ms": round(ttft_added, 2),
        "targets": {"throughput_overhead_pct": "<= 3", "ttft_added_ms": "<= 10"},
        "meets_targets": {"throughput": overhead <= 3, "ttft": ttft_added <= 10},
    }


def main() -> int:
    console = Console(stderr=True)
    console.print(
        "[bold]bench/inference.py[/]: node over gRPC vs llama.cpp in-process, "
        f"greedy, {NEW_TOKENS} tokens, "
        f"llama.cpp threads {THREAD_CONFIGS} on {CORES} cores"
    )
    runs = [asyncio.run(measure(console, threads)) for threads in THREAD_CONFIGS]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "inference",
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp, embedded)",
        "machine": {"platform": platform.platform(), "cpus": CORES},
        "rounds": ROUNDS,
        "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "runs": runs,
    }
    (RESULTS / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    table = Table(
        "llama threads",
        "path",
        "TTFT median (ms)",
        "decode tok/s median",
        "overhead (paired median)",
        "TTFT added",
    )
    for run in runs:
        for name in ("direct_llama_cpp", "node_over_grpc"):
            entry = run[name]
            node = name == "node_over_grpc"
            table.add_row(
                str(run["llama_threads"]),
                name,
                f"{entry['ttft_ms_median']:.1f}",
                f"{entry['decode_tokens_per_s_median']:.1f}",
                f"{run['throughput_overhead_pct']}% {run['throughput_overhead_pct_quartiles']}" if node else "",
                f"{run['ttft_added_ms']} ms" if node else "",
            )
    console.print(table)
    console.print("targets: throughput overhead <= 3%, TTFT added <= 10 ms")
    console.print(f"wrote {RESULTS / 'inference.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
