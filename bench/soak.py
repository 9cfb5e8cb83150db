"""Soak: many concurrent streams through one router for a long time, while inference nodes and
relays are killed (SIGKILL) and restarted on a schedule. The router resumes a stream cut
mid-answer on another node (``services/router/service.py``); this checks, at scale and for a
long time, that no token is ever lost or repeated, that every receipt chain checks at the client,
and that the router's and relays' memory stays flat.

Swarm: a real local swarm (``LocalSwarm``: every node its own process, gRPC over loopback,
membership by gossip from one seed), no ledger: 1 router (3-hop onion circuits by default),
5 relays (so that a 3-hop path survives one killed), 4 inference nodes with the EMULATED engine
(sleep-based, deterministic: the next token is a hash of the context, so the uninterrupted
answer to every prompt is known in advance: this script computes it with the same engine class).

Sizing for a 2-core machine. The work that costs CPU is per token (a cell through 3 relays, each
peeling a ChaCha20-Poly1305 layer and passing it on over gRPC, then the router, then the client)
and per circuit set-up; the number of open streams costs memory and timers, not CPU. So the
emulated decode speed is chosen so that the whole swarm produces a fixed ``--swarm-tokens-per-s``
(default 300; a 2-core machine relays about that many tokens a second through 3 hops with room for
the resumption storms a kill causes): the decode time per token is ``streams / rate`` (1,000
streams: 3.3 s a token; 100: 0.33 s), with ``batch_slowdown`` 0 (the emulated engine would
otherwise slow every running stream by 10% per other one). ``max_concurrent`` is 256 per node
(the config's maximum), and there are 5 nodes: the swarm is provisioned for one node down (4 x 256
slots still hold 1,000 streams). With 4 nodes, the 232 streams a kill left queued behind the other
three's 768 slots waited past the router's 30 s resume deadline (UNAVAILABLE). Answers are 16 tokens
(``max_new_tokens``, greedy), so a stream lasts about 16 decode times and is likely to be cut by
a fault: a kill every 30 s (alternately an inference node and a relay, random among the live
ones, the seed included, restarted 10 s later; never two down at once) cuts about a fifth (node)
or 60% (relay) of the streams in flight. A restarted seed knows nobody (it has no seed of its
own): it rejoins because members gossip to the dead (``swarmserve/overlay/membership.py``).

Clients: one asyncio process keeps ``--streams`` streams in flight (each worker starts a new one
as its last ends) against the router's gRPC ``Generate``, over 4 HTTP/2 connections, with
distinct prompts. Each completed stream's token ids are compared with the uninterrupted answer
(tokens lost, repeated or changed: must be 0) and its summary checked with
``swarmserve.client.check_summary`` (every segment signed by its node and co-signed by the router,
the stream receipt naming them all, exactly these tokens). Errors are counted by gRPC status code
(with sample messages, and whether tokens had already arrived); resumptions from the summaries
(``len(earlier_segments)``) and from the router's /metrics (resumptions, retries, resume gap).

Memory: the resident set (/proc/PID/status VmRSS) and CPU time of every process, the relays' and
inference nodes' open circuits and the router's requests in flight are sampled every few seconds.
After the load ends (the last streams drain, faults stop), open circuits and requests in flight
must fall to 0, but for the circuits the router's pool keeps ready (``pool_ready``, up to
3 relays each; a leak otherwise). Writes bench/results/soak.json (all figures and the time
series) and soak.png (RSS of the router and relays over time, open circuits, throughput).

Run: ``make soak`` (1,000 streams for 10 minutes, about 12 minutes in all), or
``python bench/soak.py --quick`` (100 streams for 60 s, written to a temporary directory unless
``--out`` says where) for tuning; ``--streams`` and ``--duration-s`` set the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from services.inference.emulated import EmulatedEngine  # noqa: E402
from services.inference.engine import Sampling  # noqa: E402
from swarmserve.client import ReceiptError, check_summary  # noqa: E402
from swarmserve.swarm import LocalSwarm, SwarmError, free_port_block  # noqa: E402
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODEL = "emulated-soak"
RELAYS, INFERENCE_NODES, HOPS = 5, 5, 3
MAX_NEW_TOKENS = 16
PROMPT_WORDS = 24
SLOTS = 256  # max_concurrent per inference node: the config's maximum
MAX_QUEUE = 4096
PREFILL_US = 200.0
CHANNELS = 4  # client connections to the router
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Live:
    started: float
    last: float
    tokens: int = 0


@dataclass
class Tally:
    """What the clients saw."""

    started: int = 0
    completed: int = 0  # with a summary
    correct: int = 0  # completed, the uninterrupted tokens, receipts check
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    errors_after_tokens: Counter[str] = field(default_factory=Counter)
    messages: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    resumptions: Counter[int] = field(default_factory=Counter)  # completed streams by segments - 1
    lost: int = 0
    repeated: int = 0
    changed: int = 0
    mismatched: int = 0
    mismatched_resumed: int = 0
    mismatch_examples: list[dict[str, Any]] = field(default_factory=list)
    receipt_failures: Counter[str] = field(default_factory=Counter)
    count_mismatches: int = 0  # summary's completion_tokens != tokens received
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    max_gap_s: list[float] = field(default_factory=list)  # per completed stream: longest wait between tokens
    ended_at: list[float] = field(default_factory=list)  # completion times (since the load started)
    live: dict[int, Live] = field(default_factory=dict)
    hung: list[dict[str, Any]] = field(default_factory=list)

    def error(self, code: str, message: str, tokens: int) -> None:
        self.errors[code] += 1
        if tokens:
            self.errors_after_tokens[code] += 1
        # Node ids, request ids and numbers differ from one error to the next: one line per kind.
        kind = re.sub(r"\b[0-9a-f]{8,}\b", "<id>", message)
        kind = re.sub(r"\d+(\.\d+)?", "N", kind)[:240]
        self.messages[code][kind] += 1


def compare(got: list[int], want: list[int]) -> tuple[int, int, int]:
    """(tokens lost, repeated, changed) of ``got`` against the uninterrupted ``want``."""
    if got == want:
        return 0, 0, 0
    same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    for k in range(1, len(want) - same + 1):
        if got[same:] == want[same + k :]:
            return k, 0, 0
    for k in range(1, len(got) - same + 1):
        if got[same + k :] == want[same:]:
            return 0, k, 0
    differing = sum(1 for a, b in zip(got[same:], want[same:], strict=False) if a != b)
    return 0, 0, differing + abs(len(got) - len(want))


def prompt_for(seed: int, index: int) -> str:
    rng = random.Random(seed * 1_000_003 + index)
    words = " ".join(f"w{rng.randrange(50_000)}" for _ in range(PROMPT_WORDS))
    return f"soak {seed} stream {index}: {words}"


class Clients:
    def __init__(self, router: str, seed: int, timeout_s: float) -> None:
        self.seed = seed
        self.timeout_s = timeout_s
        # Separate connections (a local subchannel pool each), as many clients would have.
        self.channels = [
            aio.insecure_channel(router, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)
        ]
        self.stubs = [router_pb2_grpc.RouterStub(c) for c in self.channels]
        # The reference: the same engine class, with no sleeping.
        self.engine = EmulatedEngine(MODEL, slots=1, prefill_us_per_token=0, decode_us_per_token=0)
        self.tally = Tally()
        self.t0 = time.monotonic()
        self.t0_unix = time.time()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def reference(self, prompt: str) -> list[int]:
        stream = self.engine.generate(self.engine.tokenize(prompt), Sampling(max_new_tokens=MAX_NEW_TOKENS))
        return [token.token_id async for token in stream]

    def request(self, index: int) -> router_pb2.GenerateRequest:
        return router_pb2.GenerateRequest(
            model=MODEL,
            prompt=prompt_for(self.seed, index),
            privacy=router_pb2.PrivacyOptions(hops=HOPS),
            sampling=common_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, seed=self.seed + index),
        )

    async def stream(self, index: int) -> None:
        tally = self.tally
        request = self.request(index)
        want = await self.reference(request.prompt)
        ids: list[int] = []
        texts: list[bytes] = []
        summary: router_pb2.GenerateSummary | None = None
        started = time.monotonic()
        live = tally.live[index] = Live(started, started)
        first: float | None = None
        max_gap = 0.0
        tally.started += 1
        try:
            async for reply in self.stubs[index % CHANNELS].Generate(request, timeout=self.timeout_s):
                if reply.HasField("summary"):
                    summary = reply.summary
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                else:
                    max_gap = max(max_gap, now - live.last)
                live.last = now
                ids.extend(reply.token.token_ids)
                texts.extend(reply.token.token_texts)
                live.tokens = len(ids)
        except aio.AioRpcError as error:
            tally.error(error.code().name, error.details() or "", len(ids))
            return
        except Exception as error:  # counted: the soak goes on
            tally.error(f"CLIENT_{type(error).__name__}", str(error), len(ids))
            return
        except asyncio.CancelledError:
            now = time.monotonic()
            tally.hung.append(
                {
                    "index": index,
                    "tokens": len(ids),
                    "age_s": round(now - started, 1),
                    "idle_s": round(now - live.last, 1),
                }
            )
            raise
        finally:
            del tally.live[index]
        ended = time.monotonic()
        tally.tokens += len(ids)
        if summary is None:
            tally.error("NO_SUMMARY", "the stream ended without a summary", len(ids))
            return
        tally.completed += 1
        tally.ended_at.append(ended - self.t0)
        resumed = len(summary.earlier_segments)
        tally.resumptions[resumed] += 1
        tally.latency_s.append(ended - started)
        tally.ttft_s.append((first or ended) - started)
        tally.max_gap_s.append(max_gap)
        ok = True
        if summary.timing.completion_tokens != len(ids):
            tally.count_mismatches += 1
            ok = False
        lost, repeated, changed = compare(ids, want)
        if lost or repeated or changed:
            ok = False
            tally.mismatched += 1
            tally.mismatched_resumed += resumed > 0
            tally.lost += lost
            tally.repeated += repeated
            tally.changed += changed
            if len(tally.mismatch_examples) < 10:
                tally.mismatch_examples.append(
                    {
                        "index": index,
                        "resumptions": resumed,
                        "got": ids,
                        "want": want,
                        "lost": lost,
                        "repeated": repeated,
                    }
                )
        try:
            check_summary(summary, ids, texts, request.sampling)
        except ReceiptError as error:
            tally.receipt_failures[re.sub(r"\d+", "N", str(error))[:200]] += 1
            ok = False
        tally.correct += ok


# --- what the processes say about themselves ------------------------------------------------


def process_stats(pid: int) -> tuple[float, float] | None:
    """(resident set in MB, CPU seconds) of a live process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return (int(match.group(1)) / 1024 if match else 0.0), cpu


def scrape(address: str) -> dict[str, float] | None:
    """Every sample of a node's /metrics, by name and labels (``name{a="b"}``)."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=3) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def by_prefix(samples: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.startswith(prefix)}


def histogram_quantile(samples: dict[str, float], name: str, q: float) -> float | None:
    buckets = sorted(
        (float(m.group(1)), v)
        for k, v in samples.items()
        if (m := re.fullmatch(rf'{name}_bucket\{{le="([^"]+)"\}}', k)) and m.group(1) != "+Inf"
    )
    total = samples.get(f"{name}_count", 0.0)
    if not total:
        return None
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return float("inf")


class Monitor:
    """Samples memory, CPU, open circuits and the router's counters every ``every_s``."""

    def __init__(self, swarm: LocalSwarm, clients: Clients, every_s: float) -> None:
        self.swarm = swarm
        self.clients = clients
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        self.last_router: dict[str, float] = {}
        self.instance_counters: dict[tuple[str, int], dict[str, float]] = {}  # relays' counters, per process

    def endpoints(self) -> dict[str, str]:
        return {self.swarm.routers[0].name: self.swarm.http[self.swarm.routers[0].name], **self.swarm.metrics}

    async def sample(self) -> dict[str, Any]:
        swarm, tally = self.swarm, self.clients.tally
        pids = swarm.pids()
        names = list(self.endpoints())
        scraped = await asyncio.gather(*(asyncio.to_thread(scrape, a) for a in self.endpoints().values()))
        metrics = dict(zip(names, scraped, strict=True))
        now = time.monotonic()
        row: dict[str, Any] = {
            "t": round(time.monotonic() - self.clients.t0, 1),
            "load1": round(os.getloadavg()[0], 2),  # the machine's: other work slows everything
            "rss_mb": {},
            "cpu_s": {},
            "pid": pids,
            "open_circuits": {},
            "client": {
                "in_flight": len(tally.live),
                # the longest any stream in flight has waited for its next token (a hang grows here)
                "max_idle_s": round(max((now - live.last for live in tally.live.values()), default=0.0), 1),
                "completed": tally.completed,
                "errors": sum(tally.errors.values()),
                "tokens": tally.tokens,
                "rss_mb": (process_stats(os.getpid()) or (0.0, 0.0))[0],
            },
        }
        for name, pid in pids.items():
            stats = process_stats(pid)
            if stats is not None:
                row["rss_mb"][name], row["cpu_s"][name] = round(stats[0], 1), round(stats[1], 1)
        for name, samples in metrics.items():
            if samples is None:
                continue
            if name.startswith("router"):
                self.last_router = samples
                row["router"] = {
                    "in_flight": samples.get("swarmserve_router_requests_in_flight"),
                    "resumptions": samples.get("swarmserve_router_resumptions_total", 0.0),
                    "retries": samples.get("swarmserve_router_retries_total", 0.0),
                    # circuits built ahead of requests: open at the relays by design, not leaks
                    "pool_ready": samples.get("swarmserve_router_circuit_pool_ready", 0.0),
                }
            else:
                row["open_circuits"][name] = samples.get("swarmserve_relay_open_circuits")
                if name in pids:
                    self.instance_counters[(name, pids[name])] = by_prefix(samples, "swarmserve_relay_setups_refused")
        self.samples.append(row)
        return row

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)

    def refused_setups(self) -> dict[str, float]:
        """Circuit set-ups the relays and nodes refused, summed over every process that ran."""
        total: Counter[str] = Counter()
        for counters in self.instance_counters.values():
            for key, value in counters.items():
                total[key] += int(value)
        return dict(total)


# --- faults -------------------------------------------------------------------------------------


async def serving(address: str, timeout_s: float) -> bool:
    """Whether a restarted node answers its health check (within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aio.AioRpcError):
            async with aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        await asyncio.sleep(0.5)
    return False


async def inject_faults(
    swarm: LocalSwarm, t0: float, first_s: float, every_s: float, down_s: float, seed: int, stop: asyncio.Event
) -> list[dict[str, Any]]:
    """Kills an inference node or a relay (alternately) every ``every_s``, restarts it ``down_s``
    later, waits until it serves and the router sees it; never two down at once."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    kinds = itertools.cycle(["inference", "relay"])
    expected = len(swarm.relays) + len(swarm.inference)
    next_at = t0 + first_s
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        if stop.is_set():
            return events
        kind = next(kinds)
        victim = rng.choice(list(swarm.inference if kind == "inference" else swarm.relays))
        process = swarm._processes[victim.name]
        event: dict[str, Any] = {"kind": kind, "name": victim.name, "pid": process.pid}
        swarm.signal(victim.name, signal.SIGKILL)
        event["killed_at_s"] = round(time.monotonic() - t0, 2)
        await asyncio.to_thread(process.wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), down_s)  # cut short at the end of the load
        swarm.restart(victim.name)
        event["restarted_at_s"] = round(time.monotonic() - t0, 2)
        event["serving"] = await serving(victim.listen, 60)
        try:
            await swarm.wait_until_seen(swarm.router, expected, timeout_s=60)
        except SwarmError as error:
            event["error"] = str(error)
        event["back_at_s"] = round(time.monotonic() - t0, 2)
        events.append(event)
        print(
            f"  fault: {victim.name} killed at {event['killed_at_s']:.0f} s, restarted at "
            f"{event['restarted_at_s']:.0f} s, back at {event['back_at_s']:.0f} s"
            + (f" ({event['error']})" if "error" in event else ""),
            flush=True,
        )
        next_at = max(next_at + every_s, time.monotonic() + 1.0)


# --- the run ------------------------------------------------------------------------------------


def node_env(streams: int, rate: float) -> dict[str, dict[str, str]]:
    decode_us = 1e6 * streams / rate
    timing = f"{{prefill_us_per_token: {PREFILL_US}, decode_us_per_token: {decode_us:.0f}, batch_slowdown: 0}}"
    inference = {
        "SWARMSERVE_MODELS": f"[{{name: {MODEL}, engine: emulated, emulated: {timing}}}]",
        "SWARMSERVE_POLICY__MAX_CONCURRENT": str(SLOTS),
        "SWARMSERVE_POLICY__MAX_QUEUE": str(MAX_QUEUE),
    }
    router = {"SWARMSERVE_DEFAULT_HOPS": str(HOPS), "SWARMSERVE_DUELS__RATE": "0", "SWARMSERVE_AUDITS__RATE": "0"}
    return {f"inference-{i + 1}": inference for i in range(INFERENCE_NODES)} | {"router-1": router}


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "p50": round(ordered[len(ordered) // 2], 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max": round(ordered[-1], 3),
    }


def memory_report(samples: list[dict[str, Any]], steady_from_s: float, until_s: float) -> dict[str, Any]:
    """Per process instance (a restart is a new one): RSS at its first sample in the steady part
    of the load, at its last, the most, and a least-squares slope in MB per minute."""
    series: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for row in samples:
        if steady_from_s <= row["t"] <= until_s:
            for name, rss in row["rss_mb"].items():
                series[(name, row["pid"][name])].append((row["t"], rss))
    report: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (name, pid), points in sorted(series.items(), key=lambda item: (item[0][0], item[1][0][0])):
        ts, rss = [t for t, _ in points], [r for _, r in points]
        slope = statistics.linear_regression(ts, rss).slope * 60 if len(points) >= 3 and len(set(ts)) > 1 else None
        report[name].append(
            {
                "pid": pid,
                "from_s": ts[0],
                "to_s": ts[-1],
                "rss_first_mb": rss[0],
                "rss_last_mb": rss[-1],
                "rss_max_mb": max(rss),
                "slope_mb_per_min": round(slope, 2) if slope is not None else None,
            }
        )
    return dict(report)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stream_s = MAX_NEW_TOKENS * args.streams / args.swarm_tokens_per_s  # one stream's decode time
    timeout_s = max(120.0, 5 * stream_s)
    swarm = LocalSwarm(
        workdir,
        ports_from=free_port_block(100),
        relays=RELAYS,
        inference_nodes=INFERENCE_NODES,
        node_env=node_env(args.streams, args.swarm_tokens_per_s),
        ledger=False,
    )
    print(
        f"soak: {args.streams} streams for {args.duration_s:.0f} s through 1 router, {RELAYS} relays "
        f"({HOPS} hops), {INFERENCE_NODES} emulated nodes; {MAX_NEW_TOKENS} tokens a stream at "
        f"{stream_s / MAX_NEW_TOKENS:.2f} s a token; a fault every {args.fault_every_s:.0f} s "
        f"(down {args.down_s:.0f} s); logs in {workdir / 'logs'}",
        flush=True,
    )
    started = time.monotonic()
    await swarm.start(timeout_s=180)
    print(f"  swarm ready in {time.monotonic() - started:.1f} s", flush=True)
    clients = Clients(swarm.router, args.seed, timeout_s)
    monitor = Monitor(swarm, clients, args.sample_s)
    stop_monitor, stop_faults = asyncio.Event(), asyncio.Event()
    try:
        # The reference is the engine's own: check it against a few uninterrupted streams first.
        await asyncio.gather(*(clients.stream(index) for index in range(-3, 0)))
        warm = clients.tally
        if warm.correct != 3:
            raise SystemExit(
                f"the reference does not match uninterrupted streams (errors {dict(warm.errors)}, "
                f"examples {warm.mismatch_examples[:1]}, receipts {dict(warm.receipt_failures)})"
            )
        clients.tally = Tally()
        clients.t0 = t0 = time.monotonic()
        clients.t0_unix = time.time()
        end = t0 + args.duration_s
        indices = itertools.count()

        async def worker(number: int) -> None:
            await asyncio.sleep(number * args.ramp_s / args.streams)
            while time.monotonic() < end:
                await clients.stream(next(indices))

        workers = [asyncio.create_task(worker(w)) for w in range(args.streams)]
        monitoring = asyncio.create_task(monitor.run(stop_monitor))
        faults = asyncio.create_task(
            inject_faults(swarm, t0, args.first_fault_s, args.fault_every_s, args.down_s, args.seed, stop_faults)
        )
        while time.monotonic() < end:
            await asyncio.sleep(min(args.progress_s, max(0.0, end - time.monotonic())))
            tally = clients.tally
            row = monitor.samples[-1] if monitor.samples else {"rss_mb": {}, "open_circuits": {}}
            relay_rss = [v for k, v in row["rss_mb"].items() if k.startswith("relay")]
            circuits = [v or 0 for k, v in row["open_circuits"].items() if k.startswith("relay")]
            router = row.get("router", {})
            resumed = router.get("resumptions") or 0.0
            print(
                f"  {time.monotonic() - t0:5.0f} s: in flight {len(tally.live)}, completed {tally.completed} "
                f"({tally.correct} correct), errors {sum(tally.errors.values())} {dict(tally.errors)}, "
                f"resumed {sum(n * c for n, c in tally.resumptions.items())} (router {resumed:.0f}), "
                f"lost/repeated/changed {tally.lost}/{tally.repeated}/{tally.changed}, "
                f"router RSS {row['rss_mb'].get('router-1', 0):.0f} MB, relays RSS max "
                f"{max(relay_rss, default=0):.0f} MB, relay circuits {sum(circuits):.0f}, "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        stop_faults.set()
        fault_events = await faults
        # Drain: the last streams finish (no new ones start); what is still open after the drain
        # time is a hang.
        drain_s = 3 * stream_s + 60
        print(f"  load ended; draining {len(clients.tally.live)} streams (at most {drain_s:.0f} s)", flush=True)
        drained_from = time.monotonic()
        _, pending = await asyncio.wait(workers, timeout=drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        drained_s = time.monotonic() - drained_from
        # Leaks: once every stream ended, no circuit should stay open anywhere.
        await asyncio.sleep(args.settle_s)
        after = await monitor.sample()
        stop_monitor.set()
        await monitoring
        return report(args, swarm, clients, monitor, fault_events, after, drained_s, stream_s, timeout_s)
    finally:
        stop_monitor.set()
        stop_faults.set()
        await clients.close()
        await swarm.stop()


def report(
    args: argparse.Namespace,
    swarm: LocalSwarm,
    clients: Clients,
    monitor: Monitor,
    faults: list[dict[str, Any]],
    after: dict[str, Any],
    drained_s: float,
    stream_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    tally = clients.tally
    router = monitor.last_router
    load_end = args.duration_s
    steady_from = min(args.ramp_s + stream_s, load_end / 3)
    memory = memory_report(monitor.samples, steady_from, load_end)
    gap_count = router.get("swarmserve_router_resume_gap_seconds_count", 0.0)
    resumptions = sum(n * c for n, c in tally.resumptions.items())
    return {
        "setup": {
            "streams": args.streams,
            "duration_s": args.duration_s,
            "routers": 1,
            "relays": RELAYS,
            "inference_nodes": INFERENCE_NODES,
            "hops": HOPS,
            "engine": "EMULATED (sleep-based, deterministic); real processes, sockets and onion circuits",
            "max_new_tokens": MAX_NEW_TOKENS,
            "decode_s_per_token": round(stream_s / MAX_NEW_TOKENS, 4),
            "swarm_tokens_per_s_target": args.swarm_tokens_per_s,
            "max_concurrent_per_node": SLOTS,
            "max_queue_per_node": MAX_QUEUE,
            "fault_every_s": args.fault_every_s,
            "down_s": args.down_s,
            "client_timeout_s": timeout_s,
            "seed": args.seed,
            "load_started_unix": round(clients.t0_unix, 3),  # t = 0 in the samples, for the nodes' logs
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        },
        "streams": {
            "started": tally.started,
            "completed": tally.completed,
            "correct": tally.correct,
            "errors": sum(tally.errors.values()),
            "errors_by_code": dict(tally.errors),
            "errors_after_tokens_by_code": dict(tally.errors_after_tokens),
            "error_messages": {code: messages.most_common(8) for code, messages in tally.messages.items()},
            "hung_at_end": tally.hung,
            "resumed_streams": sum(c for n, c in tally.resumptions.items() if n),
            "resumptions": resumptions,
            "streams_by_resumptions": {str(n): c for n, c in sorted(tally.resumptions.items())},
            "tokens_received": tally.tokens,
            "tokens_lost": tally.lost,
            "tokens_repeated": tally.repeated,
            "tokens_changed": tally.changed,
            "mismatched_streams": tally.mismatched,
            "mismatched_resumed_streams": tally.mismatched_resumed,
            "mismatch_examples": tally.mismatch_examples,
            "receipt_failures": dict(tally.receipt_failures),
            "completion_count_mismatches": tally.count_mismatches,
            "streams_per_s": round(tally.completed / args.duration_s, 2),
            "tokens_per_s": round(tally.tokens / args.duration_s, 1),
            "latency_s": quantiles(tally.latency_s),
            "ttft_s": quantiles(tally.ttft_s),
            "longest_gap_between_tokens_s": quantiles(tally.max_gap_s),
            "longest_wait_in_flight_s": max((row["client"]["max_idle_s"] for row in monitor.samples), default=None),
            "drain_s": round(drained_s, 1),
        },
        "router": {
            "resumptions_total": router.get("swarmserve_router_resumptions_total"),
            "retries_total": router.get("swarmserve_router_retries_total"),
            "requests_total": by_prefix(router, "swarmserve_router_requests_total"),
            "resume_gap_s": {
                "count": gap_count,
                "mean": round(router["swarmserve_router_resume_gap_seconds_sum"] / gap_count, 3) if gap_count else None,
                "p50_bucket": histogram_quantile(router, "swarmserve_router_resume_gap_seconds", 0.5),
                "p99_bucket": histogram_quantile(router, "swarmserve_router_resume_gap_seconds", 0.99),
            },
            "in_flight_after_drain": after.get("router", {}).get("in_flight"),
        },
        "circuits_open_after_drain": after["open_circuits"],
        "setups_refused": monitor.refused_setups(),
        "faults": faults,
        "memory_steady_from_s": steady_from,
        "memory": memory,
        "rss_after_drain_mb": after["rss_mb"],
        "cpu_s": after["cpu_s"],
        "samples": monitor.samples,
        "exit_codes": {k: v for k, v in swarm.exit_codes().items() if v is not None},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    figure, axes = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    names = sorted({n for row in samples for n in row["rss_mb"] if n.startswith(("router", "relay"))})
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2, strict=False))
    for name in names:  # one line per process instance: a restarted relay starts a new one
        instances: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for row in samples:
            if name in row["rss_mb"]:
                instances[row["pid"][name]].append((row["t"], row["rss_mb"][name]))
        for number, points in enumerate(instances.values()):
            axes[0].plot(
                [t for t, _ in points],
                [r for _, r in points],
                color=colours[name],
                linewidth=2.2 if name.startswith("router") else 1.2,
                label=name if number == 0 else None,
            )
    axes[0].set_ylabel("resident set (MB)")
    axes[0].set_title("memory of the router and the relays (a restarted relay is a new line)")
    axes[0].legend(fontsize=8, ncol=3)
    for name in sorted({n for row in samples for n in row["open_circuits"]}):
        axes[1].plot(
            [row["t"] for row in samples if row["open_circuits"].get(name) is not None],
            [row["open_circuits"][name] for row in samples if row["open_circuits"].get(name) is not None],
            label=name,
            linewidth=1.0,
        )
    axes[1].plot(
        [row["t"] for row in samples if row.get("router")],
        [row["router"]["in_flight"] or 0 for row in samples if row.get("router")],
        color="black",
        linewidth=2,
        label="router: requests in flight",
    )
    axes[1].set_ylabel("open circuits")
    axes[1].set_title("circuits open through each relay and node; the router's requests in flight")
    axes[1].legend(fontsize=7, ncol=4)
    times = [row["t"] for row in samples]
    rates = [0.0] + [
        (b["client"]["completed"] - a["client"]["completed"]) / max(b["t"] - a["t"], 1e-9)
        for a, b in itertools.pairwise(samples)
    ]
    axes[2].plot(times, rates, label="completed streams / s", color="tab:green")
    twin = axes[2].twinx()
    twin.plot(times, [row["client"]["errors"] for row in samples], label="errors (cumulative)", color="tab:red")
    twin.plot(
        [row["t"] for row in samples if row.get("router")],
        [row["router"]["resumptions"] for row in samples if row.get("router")],
        label="resumptions (cumulative, router)",
        color="tab:purple",
    )
    axes[2].set_ylabel("streams / s")
    twin.set_ylabel("count")
    axes[2].set_xlabel("seconds since the load started")
    axes[2].legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    for axis in axes:
        axis.grid(alpha=0.3)
        for fault in result["faults"]:
            colour = "tab:red" if fault["kind"] == "inference" else "tab:orange"
            axis.axvspan(fault["killed_at_s"], fault["back_at_s"], color=colour, alpha=0.12)
    s = result["streams"]
    figure.suptitle(
        f"Soak: {result['setup']['streams']} streams for {result['setup']['duration_s']:.0f} s, {HOPS} hops, "
        f"{len(result['faults'])} kills (red: node, orange: relay); {s['completed']} completed, {s['errors']} errors, "
        f"{s['resumptions']} resumptions, {s['tokens_lost']} lost / {s['tokens_repeated']} repeated tokens",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary_lines(result: dict[str, Any]) -> list[str]:
    s, r = result["streams"], result["router"]
    lines = [
        f"streams: {s['started']} started, {s['completed']} completed ({s['correct']} correct), "
        f"{s['errors']} errors {s['errors_by_code']} (after tokens: {s['errors_after_tokens_by_code']}), "
        f"{len(s['hung_at_end'])} hung at the end",
        f"resumptions: {s['resumptions']} in {s['resumed_streams']} streams {s['streams_by_resumptions']}; router "
        f"counted {r['resumptions_total']} resumptions, {r['retries_total']} retries; resume gap mean "
        f"{r['resume_gap_s']['mean']} s, P99 <= {r['resume_gap_s']['p99_bucket']} s",
        f"tokens: {s['tokens_received']} received ({s['tokens_per_s']}/s); lost {s['tokens_lost']}, repeated "
        f"{s['tokens_repeated']}, changed {s['tokens_changed']} (in {s['mismatched_streams']} streams); receipt "
        f"failures {sum(s['receipt_failures'].values())}",
        f"latency P50 {s['latency_s']['p50']} s, P99 {s['latency_s']['p99']} s; longest gap between tokens "
        f"P99 {s['longest_gap_between_tokens_s']['p99']} s, max {s['longest_gap_between_tokens_s']['max']} s",
        f"after the drain: router in flight {r['in_flight_after_drain']}, open circuits "
        f"{ {k: v for k, v in result['circuits_open_after_drain'].items() if v} or 0 }",
    ]
    for code, messages in s["error_messages"].items():
        for message, count in messages[:3]:
            lines.append(f"  {code} x{count}: {message}")
    for name, instances in result["memory"].items():
        if name.startswith(("router", "relay")):
            parts = [
                f"{i['rss_first_mb']:.0f}->{i['rss_last_mb']:.0f} MB ({i['slope_mb_per_min']} MB/min)"
                for i in instances
            ]
            lines.append(f"  RSS {name}: " + ", ".join(parts))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 streams for 60 s, a fault every 12 s (tuning)")
    parser.add_argument("--streams", type=int, help="streams kept in flight (default 1000; quick 100)")
    parser.add_argument("--duration-s", type=float, help="seconds of load (default 600; quick 60)")
    parser.add_argument("--swarm-tokens-per-s", type=float, default=300.0, help="sets the emulated decode speed")
    parser.add_argument("--fault-every-s", type=float, help="a kill this often (default 30; quick 12)")
    parser.add_argument("--down-s", type=float, help="how long a killed node stays down (default 10; quick 5)")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument(
        "--out", type=Path, help="where soak.json and soak.png go (default bench/results; quick: a temp dir)"
    )
    parser.add_argument("--workdir", type=Path, help="the swarm's data and logs (default: a temporary directory)")
    args = parser.parse_args()
    args.streams = args.streams or (100 if args.quick else 1000)
    args.duration_s = args.duration_s or (60.0 if args.quick else 600.0)
    args.fault_every_s = args.fault_every_s or (12.0 if args.quick else 30.0)
    args.down_s = args.down_s or (5.0 if args.quick else 10.0)
    args.first_fault_s = min(args.fault_every_s / 2 + 5, args.duration_s / 3)
    args.ramp_s = min(10.0, args.duration_s / 10)
    args.sample_s = 2.0 if args.duration_s <= 180 else 5.0
    args.progress_s = 10.0 if args.duration_s <= 180 else 30.0
    args.settle_s = 5.0
    out = args.out or (Path(tempfile.mkdtemp(prefix="soak-")) if args.quick else RESULTS)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-swarm-")))
        result = asyncio.run(run(args, workdir))
    result["seconds"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "soak.png")
    print("\n".join(summary_lines(result)))
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'} in {result['seconds']:.0f} s")
    s = result["streams"]
    return 1 if s["tokens_lost"] or s["tokens_repeated"] or s["tokens_changed"] or s["receipt_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
