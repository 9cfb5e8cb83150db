"""The inference node over gRPC against llama.cpp called directly, same run, same model; and
the cost of reproducible decoding (services/inference/schedule.py) against the engine's former
rule, same run, same context.

Both sides run SmolLM2-135M-Instruct Q4_1 (the embedded model) with the same threads, greedy
decoding, the same chat prompts and length; they alternate per prompt so drift hits both. The
node runs as its own process (`swarmserve inference`), as it would be deployed; the client is
this process. The difference is the cost of our service layer: gRPC, admission, per-token
log-probabilities, the receipt hash chain and signature, protobuf.

This machine's speed drifts from run to run (a shared VM), so each node run is paired with a
direct run of the same prompt right before or after it (the order alternates), and the figures
are medians of the paired ratios and differences.

Targets (issue #3): at most 3% lower decode throughput, at most 10 ms added to the first token.

The schedule's cost: prefill (evaluating the prompt) and time to first token (prefill, the
first token's choice by the verifiable sampler, its text) on one llama.cpp context, in-process,
with the schedule (prompt in chunks at fixed positions, 8 tokens up to position 64 then 32,
cached positions kept only up to a whole chunk) and without it (the longest cached prefix kept,
the rest in one batch), cold and with a prompt sharing a prefix already cached. The two rules
alternate within each round on the same context; figures are medians and quartiles of the
paired ratios.

Writes bench/results/inference.json and inference_schedule.png. Run: `make bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from grpc import aio
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.inference import schedule as chunking  # noqa: E402
from services.inference.models import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402
from services.inference.schedule import Evaluation, reusable_positions  # noqa: E402
from swarmserve import native  # noqa: E402
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc  # noqa: E402


def load_llama(model_path: Path, **options: Any) -> llama_cpp.Llama:
    """``llama_cpp.Llama(model_path, **options)`` with the weights in llama.cpp's plain CPU
    layout, as the engine loads them (``services.inference.llama_engine.load_model`` says why).
    llama-cpp-python takes no argument for this: its default model parameters are replaced
    while the model loads."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_layout() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain_layout
    try:
        return llama_cpp.Llama(model_path=str(model_path), **options)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


class ScheduledContext:
    """(The engine before batched decoding, kept for this benchmark: one llama-cpp-python
    context per slot.) A llama.cpp context that evaluates every stream in the batches of
    :mod:`services.inference.schedule`, keeping of what it held only what the schedule allows.

    It holds ``llama.input_ids[:llama.n_tokens]``: the first ``_prompt_length`` of them (or all,
    if fewer) evaluated as a prompt, the rest one at a time."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self.llama: Any = llama  # llama-cpp-python is untyped
        self._vocab_size = int(llama.n_vocab())
        self._prompt_length = 0

    def held(self) -> Evaluation | None:
        count = self.llama.n_tokens
        prompt_length = min(self._prompt_length, count)
        if not prompt_length:
            return None
        ids = tuple(int(token) for token in self.llama.input_ids[:count])
        return Evaluation(ids[:prompt_length], ids[prompt_length:])

    def evaluate(self, stream: Evaluation) -> int:
        """Brings the context to the end of ``stream``; returns how many positions it kept."""
        keep = reusable_positions(self.held(), stream)
        if not self.llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            self.clear()
            keep = 0
        self.llama.n_tokens = keep
        self._prompt_length = len(stream.prompt)
        for batch in stream.batches(keep):
            self.llama.eval(batch)
        return keep

    def append(self, token: int) -> None:
        """Evaluates one generated token, alone, as the schedule has it."""
        self.llama.eval([token])

    def clear(self) -> None:
        self.llama.reset()
        self.llama._ctx.kv_cache_seq_rm(-1, 0, -1)

    def logits(self, row: int = -1) -> np.ndarray[Any, Any]:
        """One row of llama.cpp's logits, in place. The view drops ctypes' explicit byte-order
        mark ("<f"), which the native sampler's buffer check does not take as float32."""
        return np.ctypeslib.as_array(self.llama._ctx.get_logits_ith(row), shape=(self._vocab_size,)).view(np.float32)


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
            "services.cli",
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
    llama = load_llama(
        default_model_path(),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
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


# --- the reproducible-decoding schedule against the former rule --------------------------------

SCHEDULE_ROUNDS = 8
# Chunk layouts (fine chunk, up to position, then chunk) the schedule's own is compared with,
# in fewer rounds: constant chunks of 8, 16, 32 and 64.
OTHER_LAYOUTS = [(size, 0, size) for size in (8, 16, 32, 64)]
OTHER_LAYOUT_ROUNDS = 4
_SENTENCES = [
    "The harbour master logs every ship that enters after dark.",
    "Lanterns along the pier are lit in a fixed order, from the breakwater inwards.",
    "Fishing boats leave two hours before dawn and return with the tide.",
    "A storm in the third week of the season closed the harbour for four days.",
    "Repairs to the north wall used stone from the old customs house.",
]


def _document(llama: Any, tokens: int) -> str:
    """Harbour notes of about ``tokens`` tokens."""
    text, i = "", 0
    while len(llama.tokenize(text.encode(), add_bos=False)) < tokens:
        text += f"{i + 1}. {_SENTENCES[i % len(_SENTENCES)]} "
        i += 1
    return text


def _former_rule(llama: Any, prompt: list[int]) -> int:
    """The engine before the schedule: keep the longest cached prefix (at least the last prompt
    token evaluated again), the rest in one batch. Returns the positions kept."""
    common = 0
    for held, wanted in zip(llama.input_ids[: llama.n_tokens], prompt, strict=False):
        if held != wanted:
            break
        common += 1
    keep = min(common, len(prompt) - 1)
    llama._ctx.kv_cache_seq_rm(-1, keep, -1)
    llama.n_tokens = keep
    llama.eval(prompt[keep:])
    return keep


def _first_token(slot: ScheduledContext, prompt: list[int]) -> None:
    sampler = native.Sampler(0.0, 0, 1.0, 1.0, 0, prompt)
    slot.llama.detokenize([sampler.choose(slot.logits().data)])


def _timed(slot: ScheduledContext, rule: str, prompt: list[int]) -> tuple[float, float, int]:
    """(prefill ms, time to first token ms, positions kept) for ``prompt`` under ``rule``."""
    started = time.perf_counter()
    kept = slot.evaluate(Evaluation(tuple(prompt))) if rule == "schedule" else _former_rule(slot.llama, prompt)
    prefilled = time.perf_counter()
    _first_token(slot, prompt)
    return (prefilled - started) * 1000, (time.perf_counter() - started) * 1000, kept


@contextlib.contextmanager
def _chunk_layout(layout: tuple[int, int, int]) -> Iterator[str]:
    """The schedule with another chunk layout, for this comparison only (nodes always use the
    module's own); yields its description."""
    saved = chunking.FINE_CHUNK, chunking.FINE_SPAN, chunking.CHUNK
    chunking.FINE_CHUNK, chunking.FINE_SPAN, chunking.CHUNK = layout
    fine, span, chunk = layout
    try:
        yield f"{fine} tokens up to position {span}, then {chunk}" if span else f"{chunk} tokens"
    finally:
        chunking.FINE_CHUNK, chunking.FINE_SPAN, chunking.CHUNK = saved


def measure_schedule(console: Console, layout: tuple[int, int, int], rounds: int) -> dict[str, Any]:
    llama = load_llama(default_model_path(), n_ctx=2048, n_threads=CORES, n_threads_batch=CORES, verbose=False)
    slot = ScheduledContext(llama)
    formatter = Jinja2ChatFormatter(template=llama.metadata["tokenizer.chat_template"], eos_token="", bos_token="")

    def chat(text: str) -> list[int]:
        prompt = formatter(messages=[{"role": "user", "content": text}]).prompt
        return list(llama.tokenize(prompt.encode(), add_bos=True, special=True))

    questions = ("Which boats leave first, and when?", "What closed the harbour, and for how long?")
    scenarios: list[tuple[str, list[int], list[int] | None]] = [
        ("cold, short chat", chat(PROMPTS[0]), None),
        ("chat after another chat (system prompt cached)", chat(PROMPTS[0]), chat(PROMPTS[1])),
        *((f"cold, {n}-token document", chat(_document(llama, n) + questions[0]), None) for n in (150, 450)),
        *(
            (
                f"{n}-token document cached, new question",
                chat(_document(llama, n) + questions[1]),
                chat(_document(llama, n) + questions[0]),
            )
            for n in (150, 450)
        ),
    ]
    results = []
    with _chunk_layout(layout) as chunks, Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"schedule (chunks of {chunks}) vs former rule", total=rounds * len(scenarios))
        for name, prompt, cached in scenarios:
            samples: dict[str, list[tuple[float, float, int]]] = {"schedule": [], "former": []}
            for round_ in range(rounds + 1):  # round 0 warms up
                for rule in ("schedule", "former") if round_ % 2 else ("former", "schedule"):
                    slot.clear()
                    if cached is not None:  # the shared prefix, evaluated by the same rule
                        _timed(slot, rule, cached)
                    sample = _timed(slot, rule, prompt)
                    if round_:
                        samples[rule].append(sample)
                if round_:
                    progress.advance(task)
            entry: dict[str, Any] = {"scenario": name, "prompt_tokens": len(prompt)}
            for index, metric in ((0, "prefill_ms"), (1, "ttft_ms")):
                ratios = [s[index] / f[index] for s, f in zip(samples["schedule"], samples["former"], strict=True)]
                quartiles = statistics.quantiles(ratios, n=4)
                entry[metric] = {
                    rule: {
                        "median": round(statistics.median(x[index] for x in runs), 2),
                        "quartiles": [round(q, 2) for q in statistics.quantiles([x[index] for x in runs], n=4)],
                    }
                    for rule, runs in samples.items()
                }
                entry[metric]["ratio_schedule_to_former"] = {
                    "median": round(statistics.median(ratios), 3),
                    "quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
                }
            entry["cached_positions_kept"] = {rule: runs[0][2] for rule, runs in samples.items()}
            results.append(entry)
    llama.close()
    return {
        "prefill_chunks": chunks,
        "llama_threads": CORES,
        "rounds": rounds,
        "what": "in-process llama.cpp context; schedule = services/inference/schedule.py, former = longest "
        "cached prefix kept, the rest in one batch; ttft = prefill + first token chosen and detokenized",
        "scenarios": results,
    }


def plot_schedule(schedule: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = schedule["scenarios"][::-1]  # top to bottom in the order measured
    figure, axis = plt.subplots(figsize=(9, 4.8))
    height = 0.38
    for offset, rule, label in (
        (height / 2, "former", "former rule (longest cached prefix, one batch)"),
        (-height / 2, "schedule", f"schedule (chunks of {schedule['prefill_chunks']})"),
    ):
        medians = [s["prefill_ms"][rule]["median"] for s in scenarios]
        low = [m - s["prefill_ms"][rule]["quartiles"][0] for m, s in zip(medians, scenarios, strict=True)]
        high = [s["prefill_ms"][rule]["quartiles"][2] - m for m, s in zip(medians, scenarios, strict=True)]
        positions = [i + offset for i in range(len(scenarios))]
        axis.barh(positions, medians, height, xerr=[low, high], capsize=3, label=label)
        for y, value in zip(positions, medians, strict=True):
            axis.text(value * 1.05, y, f"{value:.0f}", va="center", fontsize=7)
    ratios = [s["prefill_ms"]["ratio_schedule_to_former"]["median"] for s in scenarios]
    labels = [
        f"{s['scenario']} ({s['prompt_tokens']} tok)\nschedule/former {ratio:.2f}"
        for s, ratio in zip(scenarios, ratios, strict=True)
    ]
    axis.set_yticks(range(len(scenarios)), labels, fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("prefill, ms (median and quartiles; log scale)")
    axis.set_title(f"Reproducible decoding: prefill cost, {schedule['llama_threads']} threads, SmolLM2-135M Q4_1")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _prefill_ratios(schedule: dict[str, Any]) -> dict[str, Any]:
    """A layout's prefill ratios (schedule / former rule) by scenario."""
    return {
        "prefill_chunks": schedule["prefill_chunks"],
        "rounds": schedule["rounds"],
        "prefill_ratio_schedule_to_former": {
            s["scenario"]: s["prefill_ms"]["ratio_schedule_to_former"] for s in schedule["scenarios"]
        },
    }


def main() -> int:
    console = Console(stderr=True)
    console.print(
        "[bold]bench/inference.py[/]: node over gRPC vs llama.cpp in-process, "
        f"greedy, {NEW_TOKENS} tokens, "
        f"llama.cpp threads {THREAD_CONFIGS} on {CORES} cores"
    )
    runs = [asyncio.run(measure(console, threads)) for threads in THREAD_CONFIGS]
    schedule = measure_schedule(console, (chunking.FINE_CHUNK, chunking.FINE_SPAN, chunking.CHUNK), SCHEDULE_ROUNDS)
    layouts = [_prefill_ratios(measure_schedule(console, layout, OTHER_LAYOUT_ROUNDS)) for layout in OTHER_LAYOUTS]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "inference",
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp, embedded)",
        "machine": {"platform": platform.platform(), "cpus": CORES},
        "rounds": ROUNDS,
        "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "runs": runs,
        "schedule": schedule,
        "other_chunk_layouts": layouts,
    }
    (RESULTS / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_schedule(schedule, RESULTS / "inference_schedule.png")
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
    costs = Table(
        "scenario",
        "tokens",
        "kept (former / schedule)",
        "prefill ms (former / schedule)",
        "ratio [quartiles]",
        "TTFT ratio",
    )
    for entry in schedule["scenarios"]:
        prefill, ttft = entry["prefill_ms"], entry["ttft_ms"]
        costs.add_row(
            entry["scenario"],
            str(entry["prompt_tokens"]),
            f"{entry['cached_positions_kept']['former']} / {entry['cached_positions_kept']['schedule']}",
            f"{prefill['former']['median']} / {prefill['schedule']['median']}",
            f"{prefill['ratio_schedule_to_former']['median']} {prefill['ratio_schedule_to_former']['quartiles']}",
            f"{ttft['ratio_schedule_to_former']['median']} {ttft['ratio_schedule_to_former']['quartiles']}",
        )
    console.print(costs)
    others = Table("chunks", *(s["scenario"] for s in schedule["scenarios"]), title="prefill, schedule / former rule")
    for layout in [_prefill_ratios(schedule), *layouts]:
        ratios = layout["prefill_ratio_schedule_to_former"]
        others.add_row(
            layout["prefill_chunks"], *(f"{ratios[s['scenario']]['median']:.2f}" for s in schedule["scenarios"])
        )
    console.print(others)
    console.print(f"wrote {RESULTS / 'inference.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
