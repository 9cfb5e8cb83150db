"""The data plane under load: tokens per second and time to first token through one router, with
N concurrent streams, through 0 and 3 onion hops, in the same run; and what each relayed cell
costs a relay in CPU, set against the cost of its cryptography alone (``bench/crypto.py``).

Swarm (issue 17's set-up): a real local swarm (``LocalSwarm``: every node its own process, gRPC
over loopback, membership by gossip), no ledger: 1 router, 3 relays, 4 inference nodes with the
EMULATED engine at 20 ms a token with no batch slowdown (``batch_slowdown: 0``) and 256 slots
each, so that the engine is never the limit: ideal throughput is N x 50 tokens/s. The hop count
is per request (``PrivacyOptions.hops``), so both columns come from the same processes.

Load: for each N and hop count, N workers each run 32-token streams back to back for
``--duration-s`` (after a ramp of ``--ramp-s`` whose streams are not counted); throughput is the
tokens received in the measured window over its length; TTFT is from sending the request to the
first token, for streams started in the window; a stream that ends in an error is a failure. The
clients run in this process, over 4 connections.

CPU: each process's CPU time (``/proc``) over the window; per relayed cell, the relays' CPU
seconds over the cells they forwarded in the window (``swarmserve_relay_cells_forwarded`` in
both directions), in microseconds; the router's and the inference nodes' CPU per token too.

Data planes, in the same run from the same relays and nodes: router-1 starts its circuits on the
links (``data_plane: link``: one ``Relay.Link`` stream per neighbour, cells batched into frames,
every per-cell step in ``native/src/link.rs``), router-3 on the Python path (``circuit-rpc``: one
``Relay.Circuit`` call per circuit, each cell a gRPC message at each hop). Each point is
measured for both, one after the other. The link engine's own CPU per forwarded cell in this
process with 1, 8 and 64 cells per frame, against one Python call per cell that only peels a
layer, is ``link_engine`` in the JSON.

Writes ``bench/results/dataplane.json`` and ``dataplane.png``. ``--quick``: N = 50 and 200,
10 s each, one round (a few minutes). ``make bench`` runs the full sweep: N = 50, 200, 500,
1,000, 20 s each, 2 rounds (each round's figures kept, so the spread shows).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402

from bench.soak import process_stats, quantiles, scrape  # noqa: E402
from bench.streams import interval  # noqa: E402
from swarmserve import native  # noqa: E402
from swarmserve.swarm import LocalSwarm, free_port_block  # noqa: E402
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODEL = "emulated-dataplane"
RELAYS, INFERENCE_NODES = 3, 4
TOKENS = 32
DECODE_US = 20_000
SLOTS = 256
CHANNELS = 4


@dataclass
class Window:
    """What the clients saw in one measured window."""

    start: float
    end: float
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Clients:
    def __init__(self, router: str) -> None:
        self.router = router
        self.channels = [
            aio.insecure_channel(router, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)
        ]
        self.stubs = [router_pb2_grpc.RouterStub(c) for c in self.channels]
        self.counter = 0

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def stream(self, hops: int, window: Window) -> None:
        self.counter += 1
        index = self.counter
        request = router_pb2.GenerateRequest(
            model=MODEL,
            prompt=f"dataplane stream {index}: tell me about the number {index * 7919 % 100_003}",
            privacy=router_pb2.PrivacyOptions(hops=hops),
            sampling=common_pb2.SamplingParams(max_new_tokens=TOKENS, seed=index),
        )
        started = time.monotonic()
        first: float | None = None
        try:
            async for reply in self.stubs[index % CHANNELS].Generate(request, timeout=300):
                if reply.HasField("summary"):
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                if window.start <= now < window.end:
                    window.tokens += len(reply.token.token_ids)
        except aio.AioRpcError as error:
            if window.start <= started < window.end:
                window.failed += 1
                code = error.code().name
                window.errors[code] = window.errors.get(code, 0) + 1
            return
        if window.start <= started < window.end:
            window.completed += 1
            window.ttft_s.append((first or time.monotonic()) - started)


def relay_cells(swarm: LocalSwarm) -> tuple[float, float]:
    """Data cells the relays forwarded (both ways), and link frames they received."""
    cells = frames = 0.0
    for relay in swarm.relays:
        samples = scrape(swarm.metrics[relay.name]) or {}
        cells += sum(v for k, v in samples.items() if k.startswith("swarmserve_relay_cells_forwarded_total"))
        frames += sum(
            v for k, v in samples.items() if k.startswith('swarmserve_relay_link_frames_total{direction="received"')
        )
    return cells, frames


def cpu_seconds(swarm: LocalSwarm) -> dict[str, float]:
    return {name: stats[1] for name, pid in swarm.pids().items() if (stats := process_stats(pid)) is not None}


async def measure_point(
    swarm: LocalSwarm,
    clients: Clients,
    router: str,
    streams: int,
    hops: int,
    ramp_s: float,
    duration_s: float,
) -> dict[str, Any]:
    begin = time.monotonic()
    window = Window(begin + ramp_s, begin + ramp_s + duration_s)

    async def worker(number: int) -> None:
        await asyncio.sleep(number * ramp_s / 2 / streams)  # spread the starts over half the ramp
        while time.monotonic() < window.end:
            await clients.stream(hops, window)

    workers = [asyncio.create_task(worker(w)) for w in range(streams)]
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    cpu_before, cells_before = cpu_seconds(swarm), await asyncio.to_thread(relay_cells, swarm)
    client_before = (process_stats(os.getpid()) or (0.0, 0.0))[1]
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    cpu_after, cells_after = cpu_seconds(swarm), await asyncio.to_thread(relay_cells, swarm)
    client_after = (process_stats(os.getpid()) or (0.0, 0.0))[1]
    await asyncio.gather(*workers)  # the last streams finish (not counted)
    cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after}
    cells, frames = cells_after[0] - cells_before[0], cells_after[1] - cells_before[1]
    relay_cpu = sum(v for k, v in cpu.items() if k.startswith("relay"))
    node_cpu = sum(v for k, v in cpu.items() if k.startswith("inference"))
    return {
        "streams": streams,
        "hops": hops,
        "tokens_per_s": round(window.tokens / duration_s, 1),
        "ideal_tokens_per_s": round(streams * 1e6 / DECODE_US, 1),
        "ttft_s": quantiles(window.ttft_s),
        "completed": window.completed,
        "failed": window.failed,
        "errors": window.errors,
        "cpu_s": cpu | {"clients": round(client_after - client_before, 2)},
        "cpu_share_of_machine": round(sum(cpu.values()) / duration_s / (os.cpu_count() or 1), 2),
        "relay_cells": int(cells),
        "relay_link_frames_received": int(frames),
        "cells_per_link_frame": round(cells / frames, 2) if frames else None,
        "relay_cpu_us_per_cell": round(1e6 * relay_cpu / cells, 1) if cells else None,
        "router_cpu_us_per_token": round(1e6 * cpu.get(router, 0.0) / window.tokens, 1) if window.tokens else None,
        "inference_cpu_us_per_token": round(1e6 * node_cpu / window.tokens, 1) if window.tokens else None,
    }


async def pool_ttft(swarm: LocalSwarm, requests: int) -> dict[str, Any]:
    """One stream at a time, 3 hops, 4 tokens: TTFT through router-1 (circuit pool) and router-2
    (no pool), alternating, a pause between requests for the pool to refill; medians, and the
    median of paired differences with a 95% bootstrap interval."""
    ttft: dict[str, list[float]] = {"pool": [], "no_pool": []}
    channels = {name: aio.insecure_channel(r.listen) for name, r in zip(ttft, swarm.routers[:2], strict=True)}
    try:
        for index in range(requests):
            for name in ttft if index % 2 == 0 else reversed(list(ttft)):
                request = router_pb2.GenerateRequest(
                    model=MODEL,
                    prompt=f"pool probe {index}",
                    privacy=router_pb2.PrivacyOptions(hops=3),
                    sampling=common_pb2.SamplingParams(max_new_tokens=4, seed=index),
                )
                started = time.monotonic()
                first = None
                async for reply in router_pb2_grpc.RouterStub(channels[name]).Generate(request, timeout=60):
                    if first is None and reply.HasField("token"):
                        first = time.monotonic() - started
                ttft[name].append(first or 0.0)
                await asyncio.sleep(0.05)
    finally:
        for channel in channels.values():
            await channel.close(None)
    differences = [(a - b) * 1000 for a, b in zip(ttft["pool"], ttft["no_pool"], strict=True)]
    return {
        "requests_per_router": requests,
        "pool_ms": {k: round(v * 1000, 2) for k, v in quantiles(ttft["pool"]).items() if v is not None},
        "no_pool_ms": {k: round(v * 1000, 2) for k, v in quantiles(ttft["no_pool"]).items() if v is not None},
        "difference_ms": {
            "median": round(statistics.median(differences), 2),
            "ci95": [round(bound, 2) for bound in interval(differences)],
        },
    }


def engine_cost(cells: int = 64_000) -> dict[str, Any]:
    """In this process: what the native link engine (``native.LinkEngine``; issue 17, not yet on
    the wire) costs a relay per forwarded cell when k cells arrive per frame (one Python call
    takes a frame in, one takes the frames out), against one Python call per cell peeling one
    layer (``CircuitHop.peel_forward``: the cryptography and nothing else). 64-byte payloads,
    64 circuits of 2 hops (the relay and an exit)."""
    relay_key, exit_key = native.OnionKey.generate(), native.OnionKey.generate()
    router, relay, exit_ = native.LinkEngine(), native.LinkEngine(), native.LinkEngine()
    links = {1: (relay, 10), 10: (router, 1), 11: (exit_, 20), 20: (relay, 11)}

    def pump() -> None:
        moved = True
        while moved:
            moved = False
            for engine in (router, relay, exit_):
                for out_link, frame in engine.take_frames(1 << 20):
                    target, at = links[out_link]
                    target.receive(at, frame)
                    moved = True
            for engine, key, decide in ((relay, relay_key, "extend"), (exit_, exit_key, "terminate")):
                for event in engine.take_events():
                    if event[0] != "setup":
                        continue
                    _, link, circuit, onion = event
                    peeled = key.peel_setup(onion)
                    if decide == "extend":
                        assert peeled.next_cell is not None
                        engine.extend(link, circuit, peeled.hop, 11, peeled.next_cell)
                    else:
                        engine.terminate(link, circuit, peeled.hop, circuit)
                    moved = True

    circuits = 64
    for handle in range(circuits):
        router.originate(1, [(relay_key.public_key, b"exit"), (exit_key.public_key, b"")], handle)
    pump()
    assert sum(e[0] == "opened" for e in router.take_events()) == circuits
    payload = bytes(64)
    results: dict[str, Any] = {}
    for per_frame in (1, 8, 64):
        frames = []
        for start in range(0, cells, per_frame):
            for i in range(per_frame):
                router.send((start + i) % circuits, payload)
            frames.extend(frame for _, frame in router.take_frames(1 << 20))
        started = time.process_time()
        for frame in frames:
            relay.receive(10, frame)
            relay.take_frames(1 << 20)
        results[f"{per_frame}_cells_per_frame_us_per_cell"] = round(1e6 * (time.process_time() - started) / cells, 3)
        exit_.take_events()
    key = native.OnionKey.generate()
    onion, circuit = native.Circuit.build([(key.public_key, b"")])
    hop = key.peel_setup(onion).hop
    sealed = [circuit.wrap_forward(payload) for _ in range(cells)]
    started = time.process_time()
    for cell in sealed:
        hop.peel_forward(cell)
    results["python_call_per_cell_peel_only_us"] = round(1e6 * (time.process_time() - started) / cells, 3)
    return results


def crypto_cost() -> dict[str, Any] | None:
    """The per-hop cryptography of one cell, from ``bench/results/crypto.json`` (``make bench``
    writes it before this runs)."""
    path = RESULTS / "crypto.json"
    if not path.exists():
        return None
    figures = json.loads(path.read_text())
    return {k: v for k, v in figures.items() if "hop" in k or "cell" in k} or figures


def ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round and N, from the same run: link over circuit-rpc tokens/s at each hop count, and
    3 hops over 0 hops on each plane."""
    by = {(p["round"], p["streams"], p["hops"], p["data_plane"]): p["tokens_per_s"] for p in points}
    found = []
    for round_number, streams in sorted({(p["round"], p["streams"]) for p in points}):
        row: dict[str, Any] = {"round": round_number, "streams": streams}
        for hops in (0, 3):
            link, python = (
                by.get((round_number, streams, hops, "link")),
                by.get((round_number, streams, hops, "circuit-rpc")),
            )
            if link and python:
                row[f"link_over_python_{hops}_hops"] = round(link / python, 2)
        for plane in ("link", "circuit-rpc"):
            three, zero = by.get((round_number, streams, 3, plane)), by.get((round_number, streams, 0, plane))
            if three and zero:
                row[f"{plane}_3_over_0_hops"] = round(three / zero, 2)
        found.append(row)
    return found


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (hops, colour), (plane, marker) in itertools.product(
        ((0, "tab:blue"), (3, "tab:orange")), (("link", "o"), ("circuit-rpc", "x"))
    ):
        mine = [p for p in points if p["hops"] == hops and p.get("data_plane", "circuit-rpc") == plane]
        if not mine:
            continue
        label = f"{hops} hops, {plane}"
        left.scatter(
            [p["streams"] for p in mine], [p["tokens_per_s"] for p in mine], color=colour, marker=marker, label=label
        )
        right.scatter(
            [p["streams"] for p in mine],
            [1000 * (p["ttft_s"]["p50"] or 0) for p in mine],
            color=colour,
            marker=marker,
            label=label,
        )
    counts = sorted({p["streams"] for p in points})
    left.plot(counts, [n * 1e6 / DECODE_US for n in counts], "k--", label="ideal (engine only)")
    left.set(xlabel="concurrent streams", ylabel="tokens/s through the router", xscale="log", yscale="log")
    left.legend(fontsize=8)
    right.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log", yscale="log")
    figure.suptitle("Data plane: 1 router, 3 relays, 4 emulated nodes (20 ms/token), one process each")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    timing = f"{{prefill_us_per_token: 200, decode_us_per_token: {DECODE_US}, batch_slowdown: 0}}"
    inference = {
        "SWARMSERVE_MODELS": f"[{{name: {MODEL}, engine: emulated, emulated: {timing}}}]",
        "SWARMSERVE_POLICY__MAX_CONCURRENT": str(SLOTS),
        "SWARMSERVE_POLICY__MAX_QUEUE": "4096",
    }
    router = {"SWARMSERVE_DUELS__RATE": "0", "SWARMSERVE_AUDITS__RATE": "0"}
    swarm = LocalSwarm(
        workdir,
        ports_from=free_port_block(100),
        relays=RELAYS,
        inference_nodes=INFERENCE_NODES,
        node_env={f"inference-{i + 1}": inference for i in range(INFERENCE_NODES)}
        | {
            "router-1": router,
            # router-2 builds each request's circuit when it comes: the pool's baseline
            "router-2": router | {"SWARMSERVE_CIRCUIT_POOL__ENABLED": "false"},
            # router-3 is router-1 on the Python data plane: the native path's baseline
            "router-3": router | {"SWARMSERVE_DATA_PLANE": "circuit-rpc"},
        },
        routers=3,
        ledger=False,
    )
    print(f"dataplane: starting 1 router, {RELAYS} relays, {INFERENCE_NODES} emulated nodes (logs in {workdir})")
    await swarm.start(timeout_s=180)
    planes = {
        "link": ("router-1", Clients(swarm.routers[0].listen)),
        "circuit-rpc": ("router-3", Clients(swarm.routers[2].listen)),
    }
    points = []
    pool: dict[str, Any] = {}
    try:
        for _, clients in planes.values():  # warm paths
            await asyncio.gather(*(clients.stream(hops, Window(0, 0)) for hops in (0, 3)))
        pool = await pool_ttft(swarm, args.pool_requests)
        print(
            f"  one stream at a time, 3 hops: TTFT {pool['pool_ms']['p50']} ms with the pool, "
            f"{pool['no_pool_ms']['p50']} ms without; paired difference {pool['difference_ms']}",
            flush=True,
        )
        for round_number in range(args.rounds):
            for streams in args.streams:
                for hops, plane in itertools.product(args.hops, args.planes):
                    router, clients = planes[plane]
                    point = await measure_point(swarm, clients, router, streams, hops, args.ramp_s, args.duration_s)
                    point["round"], point["data_plane"] = round_number, plane
                    points.append(point)
                    print(
                        f"  round {round_number + 1}, {plane:11s} N={streams:5d}, {hops} hops: "
                        f"{point['tokens_per_s']:8.1f} "
                        f"tokens/s (ideal {point['ideal_tokens_per_s']:.0f}), TTFT p50/p99 "
                        f"{point['ttft_s']['p50']}/{point['ttft_s']['p99']} s, failed {point['failed']}, "
                        f"relay CPU {point['relay_cpu_us_per_cell']} us/cell "
                        f"({point['cells_per_link_frame']} cells/frame), router "
                        f"{point['router_cpu_us_per_token']} us/token",
                        flush=True,
                    )
                    await asyncio.sleep(2.0)  # let queues drain between points
    finally:
        for _, clients in planes.values():
            await clients.close()
        await swarm.stop()
    return {
        "setup": {
            "routers": 1,
            "relays": RELAYS,
            "inference_nodes": INFERENCE_NODES,
            "engine": f"EMULATED: {DECODE_US / 1000:.0f} ms a token, no batch slowdown, {SLOTS} slots a node",
            "tokens_per_stream": TOKENS,
            "duration_s": args.duration_s,
            "ramp_s": args.ramp_s,
            "rounds": args.rounds,
            "data_planes": {
                "link": "router-1: Relay.Link per neighbour, frames of cells, native per-cell work",
                "circuit-rpc": "router-3: Relay.Circuit per circuit, grpc.aio per cell per hop (Python)",
            },
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
        },
        "points": points,
        "ratios": ratios(points),
        "pool_ttft": pool,
        "crypto": crypto_cost(),
        "link_engine": engine_cost(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[50, 200, 500, 1000])
    parser.add_argument("--hops", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--planes", nargs="+", default=["link", "circuit-rpc"], choices=["link", "circuit-rpc"])
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--ramp-s", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="N = 50 and 200, 10 s, one round")
    parser.add_argument("--pool-requests", type=int, default=200, help="single-stream requests per router")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.duration_s, args.rounds = [50, 200], 10.0, 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="dataplane-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dataplane-swarm-") as workdir:
        results = asyncio.run(run(args, Path(workdir)))
    (out / "dataplane.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results["points"], out / "dataplane.png")
    for row in results["ratios"]:
        print("  ratios:", row)
    print(f"wrote {out / 'dataplane.json'} and {out / 'dataplane.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
