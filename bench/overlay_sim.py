"""Discrete-event simulation of overlay dispatch, with the same policy code the router runs
(swarmserve.dispatch). SIMULATED TIMING: nodes are models (speed, batch slots, prefix cache),
not real engines; nothing here is a measurement of real nodes.

Swarm: inference nodes at 1x to 4x speed, each with batch slots and a prefix cache whose hits cut
prefill; routers as entry points with skewed traffic whose hot spot moves over time; prompts share
Zipf-distributed system prefixes; Poisson arrivals swept from light load to past saturation.
Decentralized policies decide from gossiped state (refreshed every GOSSIP_S, so stale) over a
bounded candidate set (prefix-matching nodes plus random ones), as a router that knows the swarm
only through gossip would; the central oracle reads every node's true state at every decision.

Also: how many SWIM protocol periods a membership change needs to reach every node (news
piggybacked on probes and their answers, as swarmserve/overlay/membership.py sends it), and the
messages per node per period, for swarms of 10 to 10,000 nodes.

Writes bench/results/overlay_sim.json and overlay_sim.png. Run: `make bench`.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmserve.dispatch import (  # noqa: E402
    CentralOraclePolicy,
    LocalOnlyPolicy,
    NodeState,
    OverlayPolicy,
    Policy,
    RandomPolicy,
    RoundRobinPolicy,
)
from swarmserve.dispatch.prefix_tree import chunk_hashes  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NODES = 16
ROUTERS = 4
SLOTS = 4
PREFILL_S_PER_TOKEN = 0.0004  # on a 1x node
DECODE_S_PER_TOKEN = 0.02  # on a 1x node
PREFIXES = 40
PREFIX_TOKENS = 400
GOSSIP_S = 1.0
CANDIDATES = 8
REQUESTS = 3000
LOADS = [0.3, 0.6, 0.9, 1.1]  # offered load / swarm capacity
SLO_BASE_S, SLO_PER_TOKEN_S = 2.0, 0.1


@dataclass
class Request:
    arrival: float
    router: int
    prompt: list[int]
    output_tokens: int
    start: float = 0.0
    first_token: float = 0.0
    done: float = 0.0


@dataclass
class Node:
    node_id: str
    speed: float
    cache: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    running: int = 0
    queue: deque[Request] = field(default_factory=deque)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=20))

    def state(self) -> NodeState:
        recent = sum(self.latencies) / len(self.latencies) if self.latencies else 1.0 / self.speed
        return NodeState(self.node_id, recent, SLOTS, self.running, len(self.queue))

    def service(self, request: Request) -> tuple[float, float]:
        """(prefill seconds, decode seconds); prefill skips the cached prefix chunks."""
        cached = 0
        for key in chunk_hashes(request.prompt):
            if key not in self.cache:
                break
            cached += 10
            self.cache.move_to_end(key)
        for key in chunk_hashes(request.prompt):
            self.cache[key] = None
        while len(self.cache) > 2000:
            self.cache.popitem(last=False)
        prefill = (len(request.prompt) - cached) * PREFILL_S_PER_TOKEN / self.speed
        return prefill, request.output_tokens * DECODE_S_PER_TOKEN / self.speed


def workload(rate: float, rng: random.Random, count: int = REQUESTS) -> list[Request]:
    prefixes = [[rng.randrange(32000) for _ in range(PREFIX_TOKENS)] for _ in range(PREFIXES)]
    zipf = [1 / (i + 1) for i in range(PREFIXES)]
    router_weights = [1 / (i + 1) ** 1.5 for i in range(ROUTERS)]
    requests, now = [], 0.0
    for index in range(count):
        now += rng.expovariate(rate)
        hot_shift = int(now // 30) % ROUTERS  # the busy entry point moves every 30 s
        router = (rng.choices(range(ROUTERS), router_weights)[0] + hot_shift) % ROUTERS
        prompt = rng.choices(prefixes, zipf)[0] + [rng.randrange(32000) for _ in range(rng.randint(20, 100))]
        requests.append(Request(now, router, prompt, rng.randint(32, 128)))
        del index
    return requests


def simulate(policy_name: str, load: float, seed: int = 7, requests_count: int = REQUESTS) -> dict[str, float]:
    rng = random.Random(seed)
    speeds = [1.0 + 3.0 * i / (NODES - 1) for i in range(NODES)]  # 1x .. 4x
    nodes = {f"n{i:03d}": Node(f"n{i:03d}", speeds[i]) for i in range(NODES)}
    mean_service = 80 * DECODE_S_PER_TOKEN + 460 * PREFILL_S_PER_TOKEN
    capacity = sum(SLOTS * s for s in speeds) / mean_service  # requests/s the swarm sustains
    requests = workload(load * capacity, rng, requests_count)
    home = {r: list(nodes)[r * NODES // ROUTERS] for r in range(ROUTERS)}  # each router's own node
    policies: dict[str, Policy] = {
        "overlay": OverlayPolicy(rng=random.Random(seed)),
        "central-oracle": CentralOraclePolicy(rng=random.Random(seed)),
        "round-robin": RoundRobinPolicy(),
        "random": RandomPolicy(random.Random(seed)),
        "local-only": LocalOnlyPolicy(lambda entry: home[int(entry)]),
    }
    policy = policies[policy_name]
    gossiped = {n.node_id: n.state() for n in nodes.values()}
    # What each router itself sent to each node since the last gossip round: a router knows
    # its own dispatches, so it does not herd onto the node that looked idle a round ago.
    sent: dict[int, dict[str, int]] = {r: {} for r in range(ROUTERS)}
    next_gossip = GOSSIP_S
    events: list[tuple[float, int, str, Any]] = [(r.arrival, i, "arrive", r) for i, r in enumerate(requests)]
    heapq.heapify(events)
    counter = len(events)

    def start(node: Node, request: Request, now: float) -> None:
        nonlocal counter
        prefill, decode = node.service(request)
        node.running += 1
        request.start, request.first_token = now, now + prefill + DECODE_S_PER_TOKEN / node.speed
        counter += 1
        heapq.heappush(events, (now + prefill + decode, counter, "done", (node, request)))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        while now >= next_gossip:  # gossip rounds refresh what routers know
            gossiped = {n.node_id: n.state() for n in nodes.values()}
            sent = {r: {} for r in range(ROUTERS)}
            next_gossip += GOSSIP_S
        if kind == "arrive":
            request = payload
            if policy_name == "central-oracle":
                view = [n.state() for n in nodes.values()]
            else:
                matched = list(policy.tree.match(request.prompt)) if isinstance(policy, OverlayPolicy) else []
                sample = rng.sample(list(nodes), CANDIDATES)
                mine = sent[request.router]
                view = [
                    replace(gossiped[n], queued=gossiped[n].queued + mine.get(n, 0))
                    for n in dict.fromkeys(matched[:CANDIDATES] + sample)
                ]
            node = nodes[policy.choose(request.prompt, view, str(request.router))]
            policy.served(node.node_id, request.prompt, now)
            sent[request.router][node.node_id] = sent[request.router].get(node.node_id, 0) + 1
            if node.running < SLOTS:
                start(node, request, now)
            else:
                node.queue.append(request)
        else:
            node, request = payload
            request.done = now
            node.running -= 1
            node.latencies.append(now - request.arrival)
            if node.queue:
                start(node, node.queue.popleft(), now)

    latencies = sorted(r.done - r.arrival for r in requests)
    ttfts = [r.first_token - r.arrival for r in requests]
    slo = sum(r.done - r.arrival <= SLO_BASE_S + SLO_PER_TOKEN_S * r.output_tokens for r in requests)
    return {
        "mean_latency_s": sum(latencies) / len(latencies),
        "p50_latency_s": latencies[len(latencies) // 2],
        "p99_latency_s": latencies[int(len(latencies) * 0.99)],
        "mean_ttft_s": sum(ttfts) / len(ttfts),
        "slo_attainment": slo / len(requests),
    }


def gossip_rounds(members: int, retransmit_mult: int = 4, seed: int = 3) -> int:
    """Protocol periods until one membership change reaches every member, disseminated as
    swarmserve/overlay/membership.py does it: every period each member probes one other (a
    shuffled round-robin, modelled as uniform) and is answered; a member that knows the news
    carries it on its probes and answers until it has sent it retransmit_mult x ceil(log10(n+1))
    times. Each member sends one probe and on average one answer per period, whatever n is."""
    rng = random.Random(seed)
    limit = retransmit_mult * math.ceil(math.log10(members + 1))
    sent = {0: 0}
    rounds = 0
    while len(sent) < members:
        rounds += 1
        heard = set()
        for node in range(members):
            target = rng.randrange(members - 1)
            target += target >= node
            for speaker, listener in ((node, target), (target, node)):  # the probe, then its answer
                if speaker in sent and sent[speaker] < limit:
                    sent[speaker] += 1
                    heard.add(listener)
        for node in heard:
            sent.setdefault(node, 0)
        if rounds > 10 * limit:
            raise RuntimeError("the news died out before reaching everyone")
    return rounds


def versus_baselines(results: dict[str, dict[str, Any]], baselines: list[str]) -> dict[str, dict[str, float]]:
    """Ours ("overlay") against each baseline at one load, from the same run: how much lower its
    mean latency is (percent) and its SLO attainment as a multiple of theirs."""
    ours = results["overlay"]
    return {
        baseline: {
            "mean_latency_reduction_pct": round(
                (1 - ours["mean_latency_s"] / results[baseline]["mean_latency_s"]) * 100, 1
            ),
            "slo_attainment_ratio": round(ours["slo_attainment"] / max(results[baseline]["slo_attainment"], 1e-9), 2),
        }
        for baseline in baselines
    }


def main() -> int:
    print("bench/overlay_sim.py: SIMULATED timing (models of nodes, not real engines)", file=sys.stderr)
    policies = ["overlay", "central-oracle", "round-robin", "random", "local-only"]
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    for load in LOADS:
        sweep[str(load)] = {p: simulate(p, load) for p in policies}
        row = "  ".join(
            f"{p} {sweep[str(load)][p]['mean_latency_s']:.2f}s/{sweep[str(load)][p]['slo_attainment']:.0%}"
            for p in policies
        )
        print(f"load {load}: {row}", file=sys.stderr)
    comparisons = {load: versus_baselines(results, policies[1:]) for load, results in sweep.items()}
    scale = {
        n: {
            "rounds_to_reach_all": gossip_rounds(n),
            "seconds_at_default_period": gossip_rounds(n) * 0.5,
            # One probe sent and one answered per period (plus indirect probes after a miss).
            "messages_per_node_per_round": 2,
        }
        for n in (10, 100, 1000, 10_000)
    }
    report = {
        "benchmark": "overlay_sim",
        "kind": "discrete-event simulation with emulated timing; not a measurement of real nodes",
        "parameters": {
            "nodes": NODES, "routers": ROUTERS, "slots": SLOTS, "speeds": "1x..4x", "gossip_interval_s": GOSSIP_S,
            "candidates_per_decision": CANDIDATES, "requests": REQUESTS, "prefixes": PREFIXES,
            "slo": f"{SLO_BASE_S} s + {SLO_PER_TOKEN_S} s per output token",
        },
        "sweep": sweep,
        "overlay_vs_baselines": comparisons,
        "membership_dissemination": scale,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overlay_sim.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(sweep, scale, RESULTS / "overlay_sim.png")
    for load, row in comparisons.items():
        print(
            f"load {load}: "
            + ", ".join(
                f"vs {b}: {v['mean_latency_reduction_pct']}% lower mean latency, {v['slo_attainment_ratio']}x SLO"
                for b, v in row.items()
            ),
            file=sys.stderr,
        )
    print(f"wrote {RESULTS / 'overlay_sim.json'} and {RESULTS / 'overlay_sim.png'}", file=sys.stderr)
    return 0


def plot(sweep: dict[str, dict[str, dict[str, float]]], scale: dict[int, dict[str, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [float(load) for load in sweep]
    fig, (latency, slo, rounds) = plt.subplots(1, 3, figsize=(14, 4))
    for policy in next(iter(sweep.values())):
        latency.plot(loads, [sweep[str(l)][policy]["mean_latency_s"] for l in loads], marker="o", label=policy)  # noqa: E741
        slo.plot(loads, [sweep[str(l)][policy]["slo_attainment"] for l in loads], marker="o", label=policy)  # noqa: E741
    latency.set(xlabel="offered load / capacity", ylabel="mean latency (s)", yscale="log")
    slo.set(xlabel="offered load / capacity", ylabel="SLO attainment")
    latency.legend()
    rounds.plot(list(scale), [v["rounds_to_reach_all"] for v in scale.values()], marker="o")
    rounds.set(xscale="log", xlabel="swarm size (nodes)", ylabel="protocol periods to reach all (SWIM piggyback)")
    fig.suptitle("Overlay dispatch, SIMULATED (same policy code as the router; emulated node timing)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
