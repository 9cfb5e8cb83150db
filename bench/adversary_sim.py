"""How many requests an adversary holding a fraction f of the stake can link from entry to
content, with the path choice the router runs (swarmserve/dispatch/paths.py), against uniform
choice (what the router did before), in one run.

The swarm: N = 10,000 members (as PlanetServe's own analysis), 7,500 relays and 2,500 inference
nodes; honest stakes log-normal (median 100 credits, sigma 1), each honest node its own operator
in a network (/16) drawn from 20,000. The adversary holds a fraction f of all stake. A request
takes 3 relays and an exit; the adversary links it when it holds the entry relay (which sees
where the request comes from) and the exit (which sees its content): with both, timing ties
them together. The exit is drawn like the relays (stake-weighted now, uniform before): the
router's dispatch really picks exits by load and trust, which stake does not buy directly, so
this is the adversary's best case.

Schemes (each at every f, 20,000 requests, 95% Wilson intervals):

- ``uniform``: before. Uniform choice; the adversary runs a fraction f of the nodes.
- ``uniform_sybils``: before, plus 10,000 free relays of the adversary (descriptors cost nothing).
- ``stake_split``: now. The adversary's stake is spread over f x N nodes, each its own account
  in its own /16 (its best strategy against the diversity rule), plus the 10,000 free relays.
- ``stake_one_operator``: now, the adversary as one account: it never holds two hops of one path.

k-of-n multipath circuits (issue 16) do not exist yet: their figures are left out (null).
Writes bench/results/adversary_sim.json and .png. Run: `make bench` or `python bench/adversary_sim.py`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmserve.dispatch import Hop, PathChooser  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MEMBERS = 10_000
RELAY_SHARE = 0.75
SYBILS = 10_000
HOPS = 3
REQUESTS = 20_000
FRACTIONS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5]
SCHEMES = ["uniform", "uniform_sybils", "stake_split", "stake_one_operator"]
SEED = 14


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def members(f: float, scheme: str, rng: random.Random) -> tuple[list[Hop], list[Hop]]:
    """(relays, exits) with the adversary's nodes named ``adv...``."""
    by_stake = scheme.startswith("stake")
    honest_count = round(MEMBERS * (1 - f)) if not by_stake else MEMBERS
    adversary_count = max(1, round(MEMBERS * f))
    honest_stakes = [max(1, round(rng.lognormvariate(math.log(100), 1.0))) for _ in range(honest_count)]
    honest_total = sum(honest_stakes)
    adversary_total = round(honest_total * f / (1 - f))
    nodes: list[tuple[Hop, bool]] = []
    for i, stake in enumerate(honest_stakes):
        hop = Hop(f"h{i}", f"h{i}".encode(), f"n{rng.randrange(20_000)}", stake if by_stake else 0)
        nodes.append((hop, rng.random() < RELAY_SHARE))
    for i in range(adversary_count):
        operator = b"adversary" if scheme == "stake_one_operator" else f"adv{i}".encode()
        stake = max(1, adversary_total // adversary_count) if by_stake else 0
        nodes.append((Hop(f"adv{i}", operator, f"adv-net{i}", stake), rng.random() < RELAY_SHARE))
    if scheme != "uniform":
        # Free relays: a descriptor each, no stake.
        operator = b"adversary" if scheme == "stake_one_operator" else None
        for i in range(SYBILS):
            nodes.append((Hop(f"advs{i}", operator or f"advs{i}".encode(), f"advs-net{i}", 0), True))
    relays = [h for h, is_relay in nodes if is_relay]
    exits = [h for h, is_relay in nodes if not is_relay]
    return relays, exits


def simulate(f: float, scheme: str, rng: random.Random) -> dict[str, Any]:
    relays, exits = members(f, scheme, rng)
    chooser = PathChooser(relays)
    exit_chooser = PathChooser(exits)  # exits drawn by the same rule (stake, or uniform without)
    nobody = Hop("", b"", None, 0)
    linked = captured = 0
    for _ in range(REQUESTS):
        exit_ = exit_chooser.choose(1, nobody, rng)[0]
        path = chooser.choose(HOPS, exit_, rng)
        if exit_.node_id.startswith("adv") and path[0].node_id.startswith("adv"):
            linked += 1
            captured += all(h.node_id.startswith("adv") for h in path)
    low, high = wilson(linked, REQUESTS)
    adversary_stake = sum(h.stake for h in relays + exits if h.node_id.startswith("adv"))
    all_stake = sum(h.stake for h in relays + exits) or 1
    return {
        "f": f,
        "scheme": scheme,
        "adversary_stake_share": adversary_stake / all_stake,
        "adversary_node_share": sum(h.node_id.startswith("adv") for h in relays + exits) / (len(relays) + len(exits)),
        "linked_share": linked / REQUESTS,
        "linked_interval_95": [low, high],
        "whole_circuit_share": captured / REQUESTS,
        "f_squared": f * f,
    }


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for scheme in SCHEMES:
        rows = [p for p in points if p["scheme"] == scheme]
        xs = [p["f"] for p in rows]
        ys = [max(p["linked_share"], 1e-6) for p in rows]
        lows = [max(p["linked_interval_95"][0], 1e-6) for p in rows]
        highs = [max(p["linked_interval_95"][1], 1e-6) for p in rows]
        ax.plot(xs, ys, marker="o", label=scheme)
        ax.fill_between(xs, lows, highs, alpha=0.2)
    ax.plot(FRACTIONS, [f * f for f in FRACTIONS], "k--", linewidth=0.8, label="f squared")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adversary's fraction f of stake (of nodes, for uniform)")
    ax.set_ylabel("share of requests linked entry -> content")
    ax.set_title(f"N = {MEMBERS:,} members, {HOPS} hops, {REQUESTS:,} requests per point")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    console = Console()
    rng = random.Random(SEED)
    points = []
    started = time.monotonic()
    with Progress(console=console) as progress:
        task = progress.add_task("simulating", total=len(FRACTIONS) * len(SCHEMES))
        for f in FRACTIONS:
            for scheme in SCHEMES:
                points.append(simulate(f, scheme, rng))
                progress.advance(task)
    table = Table(title="Requests linked entry -> content (95% interval)")
    table.add_column("f")
    for scheme in SCHEMES:
        table.add_column(scheme)
    for f in FRACTIONS:
        row = [f"{f:g}"]
        for scheme in SCHEMES:
            p = next(p for p in points if p["f"] == f and p["scheme"] == scheme)
            low, high = p["linked_interval_95"]
            row.append(f"{p['linked_share']:.4f} [{low:.4f}, {high:.4f}]")
        table.add_row(*row)
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "members": MEMBERS,
        "relay_share": RELAY_SHARE,
        "free_sybil_relays": SYBILS,
        "hops": HOPS,
        "requests_per_point": REQUESTS,
        "seed": SEED,
        "seconds": round(time.monotonic() - started, 1),
        "multipath": None,
        "multipath_note": "k-of-n multipath circuits are issue 16; not built yet",
        "points": points,
    }
    (RESULTS / "adversary_sim.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(points, RESULTS / "adversary_sim.png")
    console.print(f"wrote {RESULTS / 'adversary_sim.json'} and adversary_sim.png")


if __name__ == "__main__":
    main()
