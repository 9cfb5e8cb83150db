"""Native crypto core against a pure-Python implementation of the same scheme (built on the
`cryptography` and `blake3` packages, tests/reference_crypto.py), measured in one run.

Measures:
- a 3-hop round trip (router wraps, three relays peel, three add backward layers, router
  strips) for a token-sized cell (48 bytes) and a 16 KiB cell;
- bulk throughput of one layer (seal) in MB/s on one core;
- the token-stream hash chain in ns per token (incremental from Python, and whole-stream);
- building and peeling a 3-hop set-up onion.

Writes bench/results/crypto.json and bench/results/crypto.png. Run: `make bench`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmserve import native  # noqa: E402
from tests import reference_crypto as ref  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGETS = {
    "round_trip_token_us": ("<=", 10.0),
    "layer_throughput_mb_s": (">=", 1000.0),
    "chain_incremental_ns_per_token": ("<=", 1000.0),
}


def per_op_ns(operation: Callable[[], Any], count: int, repeats: int = 7) -> float:
    """Median over `repeats` of the mean time of `count` calls, in ns."""
    operation()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(count):
            operation()
        samples.append((time.perf_counter_ns() - start) / count)
    return statistics.median(samples)


def native_path() -> tuple[native.Circuit, list[native.CircuitHop]]:
    keys = [native.OnionKey.generate() for _ in range(3)]
    cell, circuit = native.Circuit.build([(k.public_key, b"127.0.0.1:7000") for k in keys])
    hops = []
    for key in keys:
        peeled = key.peel_setup(cell)
        hops.append(peeled.hop)
        cell = peeled.next_cell or b""
    return circuit, hops


def reference_path() -> tuple[ref.ReferenceCircuit, list[ref.ReferenceHop]]:
    keys = [native.OnionKey.generate() for _ in range(3)]
    cell, circuit = ref.ReferenceCircuit.build([(k.public_key, b"127.0.0.1:7000") for k in keys], b"")
    hops = []
    for key in keys:
        peeled = ref.peel_setup(key.secret_bytes(), cell)
        hops.append(peeled.hop)
        cell = peeled.next_cell or b""
    return circuit, hops


def round_trip(circuit: Any, hops: list[Any], payload: bytes) -> Callable[[], None]:
    def run() -> None:
        cell = circuit.wrap_forward(payload)
        for hop in hops:
            cell = hop.peel_forward(cell)
        for hop in reversed(hops):
            cell = hop.wrap_backward(cell)
        circuit.unwrap_backward(cell)

    return run


def measure() -> dict[str, Any]:
    token = os.urandom(48)
    large = os.urandom(16 * 1024)
    bulk = os.urandom(256 * 1024)
    tokens = [(i % 50_000, b" token") for i in range(10_000)]
    header = (b"req-1", os.urandom(32), os.urandom(32), b'{"temperature":0}')
    results: dict[str, dict[str, float]] = {}

    def record(name: str, native_value: float, reference_value: float) -> None:
        results[name] = {"native": native_value, "reference": reference_value}

    with Progress(transient=True) as progress:
        task = progress.add_task("benchmarks", total=6)

        record(
            "round_trip_token_us",
            per_op_ns(round_trip(*native_path(), token), 20_000) / 1e3,
            per_op_ns(round_trip(*reference_path(), token), 2_000) / 1e3,
        )
        progress.advance(task)
        record(
            "round_trip_16k_us",
            per_op_ns(round_trip(*native_path(), large), 2_000) / 1e3,
            per_op_ns(round_trip(*reference_path(), large), 500) / 1e3,
        )
        progress.advance(task)

        native_hop = native_path()[1][0]
        reference_hop = reference_path()[1][0]
        native_ns = per_op_ns(lambda: native_hop.wrap_backward(bulk), 200)
        reference_ns = per_op_ns(lambda: reference_hop.wrap_backward(bulk), 200)
        record("layer_throughput_mb_s", len(bulk) / native_ns * 1e3, len(bulk) / reference_ns * 1e3)
        progress.advance(task)

        def native_chain() -> None:
            hasher = native.TokenStreamHasher(*header)
            for token_id, text in tokens:
                hasher.update(token_id, text)
            hasher.commitment()

        ids, texts = [t[0] for t in tokens], [t[1] for t in tokens]
        record(
            "chain_incremental_ns_per_token",
            per_op_ns(native_chain, 5) / len(tokens),
            per_op_ns(lambda: ref.token_stream_commitment(*header, tokens), 3) / len(tokens),
        )
        progress.advance(task)
        record(
            "chain_batch_ns_per_token",
            per_op_ns(lambda: native.token_stream_commitment(*header, ids, texts), 5) / len(tokens),
            per_op_ns(lambda: ref.token_stream_commitment(*header, tokens), 3) / len(tokens),
        )
        progress.advance(task)

        def native_setup() -> None:
            native_path()

        def reference_setup() -> None:
            reference_path()

        record(
            "setup_3_hops_us",
            per_op_ns(native_setup, 200) / 1e3,
            per_op_ns(reference_setup, 50) / 1e3,
        )
        progress.advance(task)

    figures: dict[str, Any] = {}
    for name, values in results.items():
        higher_is_better = name.endswith("_mb_s")
        speedup = values["native"] / values["reference"] if higher_is_better else values["reference"] / values["native"]
        entry: dict[str, Any] = {**values, "speedup_vs_reference": round(speedup, 2)}
        if name in TARGETS:
            op, bound = TARGETS[name]
            entry["target"] = f"{op} {bound:g}"
            entry["meets_target"] = values["native"] <= bound if op == "<=" else values["native"] >= bound
        figures[name] = entry
    return figures


def plot(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    speedups = [figures[n]["speedup_vs_reference"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.barh(names, speedups, color="#3b7dd8")
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlim(min(speedups) / 1.5, max(speedups) * 2.5)
    ax.set_xlabel("native speed-up over the pure-Python reference (x, log scale)")
    ax.set_title("swarmserve native crypto core vs reference (same run)")
    for bar, value in zip(bars, speedups, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:g}x", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    console = Console(stderr=True)
    console.print("[bold]bench/crypto.py[/]: native core vs pure-Python reference, one core")
    figures = measure()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "crypto",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "python": sys.version.split()[0],
        "figures": figures,
    }
    (RESULTS / "crypto.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(figures, RESULTS / "crypto.png")

    table = Table("measure", "native", "reference", "speed-up", "target", "met")
    for name, entry in figures.items():
        table.add_row(
            name,
            f"{entry['native']:.3g}",
            f"{entry['reference']:.3g}",
            f"{entry['speedup_vs_reference']}x",
            entry.get("target", ""),
            {True: "yes", False: "NO"}.get(entry.get("meets_target"), ""),
        )
    console.print(table)
    console.print(f"wrote {RESULTS / 'crypto.json'} and {RESULTS / 'crypto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
