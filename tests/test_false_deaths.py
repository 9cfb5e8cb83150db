"""No false deaths under load (issue 16, part 3), through real processes and sockets: every node
is its own process (``LocalSwarm``, emulated engines, no ledger), and what each node concluded
about every other is read from its JSON log ("member suspected", "member declared dead").

The test loads a swarm (3 relays, 2 inference nodes, a router; gossip at test speed) with 40
clients streaming through 3-hop circuits, and overloads the machine the way a 2-core box running
a busy swarm does, but repeatably: every process is also stopped (SIGSTOP) for 0.2 s out of every
0.3 s, each at its own phase, so every event loop (each node's own timers, its probes, its answers
to others' probes) runs up to 2 probe timeouts late. No live node may be declared dead by
anyone; a node killed meanwhile must still be declared dead by every other within the bound of
``swarmserve/overlay/membership.py``, which local health stretches by at most
``awareness_max_multiplier``. With the multiplier forced to 1 the same load gets live nodes
declared dead within seconds.

Run as a script for the figures, with and without Lifeguard's local health (the multiplier
forced to 1) under the same load: the issue's 200 concurrent 3-hop streams through 4 inference
nodes, 3 relays and 1 router with GossipSettings' defaults, or the test's load:

    .venv/bin/python -m tests.test_false_deaths --streams 200 --seconds 30 --runs 2
    .venv/bin/python -m tests.test_false_deaths --streams 40 --inference 2 --fast --stall 0.2 0.3 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio

from swarmserve.overlay import node_id_of, open_descriptor
from swarmserve.swarm import LocalSwarm, free_port_block
from swarmserve.v1 import common_pb2, overlay_pb2, router_pb2, router_pb2_grpc
from tests.test_overlay_faults import wait_for_state

MODEL = "emulated-false-deaths"
# tests/conftest.py's FAST_GOSSIP: a 0.2 s period, 0.1 s probe timeout, suspicion 3 periods.
PERIOD_S, PROBE_TIMEOUT_S, SUSPICION_MULT = 0.2, 0.1, 3
MAX_MULTIPLIER = 8  # awareness_max_multiplier's default
STOP_S, EVERY_S = 0.2, 0.3


def gossip_env(
    lifeguard: bool, period_s: float = 0.5, timeout_s: float = 0.2, suspicion_mult: float = 4
) -> dict[str, str]:
    """Gossip settings for every node (defaults: GossipSettings'); ``lifeguard=False`` forces
    the local health multiplier to 1."""
    return {
        "SWARMSERVE_GOSSIP__PROBE_INTERVAL_S": str(period_s),
        "SWARMSERVE_GOSSIP__PROBE_TIMEOUT_S": str(timeout_s),
        "SWARMSERVE_GOSSIP__SUSPICION_MULT": str(suspicion_mult),
        "SWARMSERVE_GOSSIP__AWARENESS_MAX_MULTIPLIER": str(MAX_MULTIPLIER if lifeguard else 1),
    }


def swarm_env(
    gossip: dict[str, str], relays: int, inference_nodes: int, slots: int, queue: int
) -> dict[str, dict[str, str]]:
    node = {
        **gossip,
        "SWARMSERVE_MODELS": f"[{{name: {MODEL}, engine: emulated, emulated: {{decode_us_per_token: 20000}}}}]",
        "SWARMSERVE_POLICY__MAX_CONCURRENT": str(slots),
        "SWARMSERVE_POLICY__MAX_QUEUE": str(queue),
    }
    env = {f"inference-{i + 1}": node for i in range(inference_nodes)}
    return env | {f"relay-{i + 1}": gossip for i in range(relays)} | {"router-1": gossip}


@asynccontextmanager
async def local_swarm(
    directory: Path, env: dict[str, dict[str, str]], relays: int, inference_nodes: int
) -> AsyncIterator[LocalSwarm]:
    swarm = LocalSwarm(
        directory,
        # The whole block LocalSwarm uses (metrics and HTTP ports 80 to 100 up), clear of the
        # ports other tests start from.
        ports_from=free_port_block(100, start=random.randrange(41000, 50000), stop=60000),
        relays=relays,
        inference_nodes=inference_nodes,
        node_env=env,
        ledger=False,
    )
    await swarm.start(timeout_s=120)
    try:
        yield swarm
    finally:
        await swarm.stop()


def names(swarm: LocalSwarm) -> list[str]:
    return [n.name for n in [*swarm.routers, *swarm.relays, *swarm.inference]]


async def node_id(router: str, address: str) -> str:
    """The node id of the member at ``address``, as ``router`` knows it (asking the node itself
    would make the asker a member, one that then dies)."""
    async with aio.insecure_channel(router) as channel:
        swarm = await router_pb2_grpc.RouterStub(channel).GetSwarm(router_pb2.GetSwarmRequest(), timeout=5)
    descriptors = [open_descriptor(m.descriptor) for m in swarm.members]
    return next(node_id_of(d) for d in descriptors if d.address == address)


@dataclass
class Verdicts:
    """What the nodes concluded about each other, from their logs so far: (observer, subject)
    pairs, counted once per event; nodes named as LocalSwarm names them."""

    suspected: Counter[tuple[str, str]] = field(default_factory=Counter)
    dead: Counter[tuple[str, str]] = field(default_factory=Counter)
    refuted: Counter[str] = field(default_factory=Counter)
    degraded: Counter[str] = field(default_factory=Counter)  # turns to "local health degraded"
    worst_lag_s: dict[str, float] = field(default_factory=dict)  # as logged at those turns

    def false_deaths(self, killed: frozenset[str] = frozenset()) -> int:
        return sum(n for (_, subject), n in self.dead.items() if subject not in killed)

    def false_suspicions(self, killed: frozenset[str] = frozenset()) -> int:
        return sum(n for (_, subject), n in self.suspected.items() if subject not in killed)

    def dead_to(self, subject: str) -> set[str]:
        """Who declared ``subject`` dead."""
        return {observer for observer, s in self.dead if s == subject}

    def figures(self, killed: frozenset[str] = frozenset()) -> dict[str, Any]:
        return {
            "false_deaths": self.false_deaths(killed),
            "false_suspicions": self.false_suspicions(killed),
            "refutations": sum(self.refuted.values()),
            "health_degraded_turns": sum(self.degraded.values()),
            "worst_loop_lag_s": max(self.worst_lag_s.values(), default=0.0),
            "dead": {f"{o}->{s}": n for (o, s), n in sorted(self.dead.items())},
        }


def read_verdicts(swarm: LocalSwarm) -> Verdicts:
    records: dict[str, list[dict[str, Any]]] = {}
    for name in names(swarm):
        path = swarm.data_dir / "logs" / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        records[name] = []
        for line in lines:
            if line.startswith("{"):
                try:
                    records[name].append(json.loads(line))
                except json.JSONDecodeError:  # a line being written
                    continue
    by_address = {n.listen: n.name for n in [*swarm.routers, *swarm.relays, *swarm.inference]}
    named = {  # node id prefix, as logged -> name
        r["node_id"]: by_address[r["address"]]
        for rs in records.values()
        for r in rs
        if r.get("event") == "member joined" and r.get("address") in by_address
    }
    verdicts = Verdicts()
    for observer, rs in records.items():
        for r in rs:
            event, subject = r.get("event"), named.get(r.get("node_id", ""), "?")
            if event == "member suspected":
                verdicts.suspected[observer, subject] += 1
            elif event == "member declared dead":
                verdicts.dead[observer, subject] += 1
            elif event == "refuting a claim about this node":
                verdicts.refuted[observer] += 1
            elif event == "local health degraded":
                verdicts.degraded[observer] += 1
                lag = float(r.get("worst_loop_lag_s", 0.0))
                verdicts.worst_lag_s[observer] = max(verdicts.worst_lag_s.get(observer, 0.0), lag)
    return verdicts


class Stalls:
    """Each process named is stopped (SIGSTOP) for ``stop_s`` out of every ``every_s``, each at
    its own random phase, until released: a machine too loaded to schedule them."""

    def __init__(self, swarm: LocalSwarm, stalled: list[str], stop_s: float, every_s: float, seed: int = 16) -> None:
        self._swarm = swarm
        rng = random.Random(seed)
        self._tasks = {
            name: asyncio.ensure_future(self._cycle(name, rng.uniform(0, every_s), stop_s, every_s)) for name in stalled
        }

    async def _cycle(self, name: str, phase_s: float, stop_s: float, every_s: float) -> None:
        try:
            await asyncio.sleep(phase_s)
            while True:
                self._swarm.signal(name, signal.SIGSTOP)
                await asyncio.sleep(stop_s)
                self._swarm.signal(name, signal.SIGCONT)
                await asyncio.sleep(every_s - stop_s)
        finally:
            self._swarm.signal(name, signal.SIGCONT)

    async def release(self, name: str) -> None:
        task = self._tasks.pop(name)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.release(name)


async def test_busy_live_nodes_are_not_declared_dead_and_a_killed_one_still_is(tmp_path: Path) -> None:
    env = swarm_env(gossip_env(True, PERIOD_S, PROBE_TIMEOUT_S, SUSPICION_MULT), 3, 2, slots=16, queue=256)
    async with local_swarm(tmp_path, env, relays=3, inference_nodes=2) as swarm:
        victim = swarm.inference[-1]
        victim_id = await node_id(swarm.router, victim.listen)
        members = len(names(swarm))
        # The bound of swarmserve/overlay/membership.py: probed within n periods, suspected by
        # the end of that period, dead after the (confirmed) suspicion timeout; each stretched by
        # the local health multiplier, at most MAX_MULTIPLIER; then slack for dissemination.
        bound_s = ((members + 1) * PERIOD_S + SUSPICION_MULT * PERIOD_S) * MAX_MULTIPLIER + 2.0
        stalls = Stalls(swarm, names(swarm), STOP_S, EVERY_S)
        # Runs to the end (a node dying under load); its outcomes are the router's business.
        load = asyncio.ensure_future(streams_load(swarm.router, 40, 600.0, tokens=32, hops=3))
        try:
            await asyncio.sleep(12.0)
            busy = read_verdicts(swarm)
            print("busy, nobody killed:", json.dumps(busy.figures()))
            assert busy.false_deaths() == 0, f"live nodes declared dead: {busy.dead}"
            # One dies, while the others are still overloaded.
            await stalls.release(victim.name)
            swarm.signal(victim.name, signal.SIGKILL)
            killed = time.monotonic()
            await wait_for_state(swarm.router, victim_id, overlay_pb2.MEMBER_STATE_DEAD, bound_s)
            survivors = set(names(swarm)) - {victim.name}
            while not survivors <= read_verdicts(swarm).dead_to(victim.name):
                assert time.monotonic() - killed < bound_s, f"not dead to every survivor within {bound_s:.1f} s"
                await asyncio.sleep(0.2)
            took = time.monotonic() - killed
        finally:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
            await stalls.close()
        after = read_verdicts(swarm)
        print(
            f"killed {victim.name}: dead everywhere in {took:.1f} s (bound {bound_s:.1f} s);",
            json.dumps(after.figures(frozenset({victim.name}))),
        )
        assert after.false_deaths(frozenset({victim.name})) == 0, f"live nodes declared dead: {after.dead}"


async def test_200_concurrent_streams_through_3_hops_all_served_and_nobody_declared_dead(tmp_path: Path) -> None:
    """The issue's load: 4 inference nodes, 3 relays and a router (each a process, gossip at
    GossipSettings' defaults) carrying 200 concurrent 3-hop streams on 2 cores. Every request is
    served (no NOT_FOUND, no UNAVAILABLE: suspected nodes still serve when no alive one can) and
    no live node is declared dead by anyone."""
    env = swarm_env(gossip_env(True), relays=3, inference_nodes=4, slots=16, queue=256)
    async with local_swarm(tmp_path, env, relays=3, inference_nodes=4) as swarm:
        await asyncio.sleep(3.0)  # everyone knows everyone
        outcomes = await streams_load(swarm.router, 200, 20.0, tokens=32, hops=3)
        await asyncio.sleep(3.0)  # late verdicts reach the logs
        verdicts = read_verdicts(swarm)
    print("200 streams:", dict(outcomes), json.dumps(verdicts.figures()))
    assert set(outcomes) == {"ok"}, f"requests not served: {dict(outcomes)}"
    assert verdicts.false_deaths() == 0, f"live nodes declared dead: {verdicts.dead}"


# --- figures (run as a script) -----------------------------------------------------------------


async def stream(router: str, text: str, tokens: int, hops: int) -> str:
    """One streamed request; its outcome: "ok" or the gRPC status name."""
    request = router_pb2.GenerateRequest(
        model=MODEL,
        prompt=text,
        privacy=router_pb2.PrivacyOptions(hops=hops),
        sampling=common_pb2.SamplingParams(max_new_tokens=tokens),
    )
    try:
        async with aio.insecure_channel(router) as channel:
            async for reply in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120):
                if reply.HasField("summary"):
                    return "ok"
    except aio.AioRpcError as error:
        return error.code().name
    return "NO_SUMMARY"


async def streams_load(router: str, clients: int, seconds: float, tokens: int, hops: int) -> Counter[str]:
    """``clients`` clients, each streaming one request after another for ``seconds``."""
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            outcome = await stream(router, f"client {index} request {n}", tokens, hops)
            outcomes[outcome] += 1
            n += 1
            if outcome != "ok":
                await asyncio.sleep(0.5)  # as a client would: refusals are immediate, not retried in a tight loop

    await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes


async def measure(directory: Path, lifeguard: bool, args: argparse.Namespace) -> dict[str, Any]:
    gossip = gossip_env(lifeguard, PERIOD_S, PROBE_TIMEOUT_S, SUSPICION_MULT) if args.fast else gossip_env(lifeguard)
    env = swarm_env(gossip, args.relays, args.inference, slots=16, queue=256)
    outcomes: Counter[str] = Counter()
    async with local_swarm(directory, env, args.relays, args.inference) as swarm:
        await asyncio.sleep(3.0)  # everyone knows everyone
        stalls = Stalls(swarm, names(swarm), *args.stall) if args.stall else None
        if args.streams:
            outcomes = await streams_load(swarm.router, args.streams, args.seconds, args.tokens, args.hops)
        else:
            await asyncio.sleep(args.seconds)
        if stalls is not None:
            await stalls.close()
        await asyncio.sleep(3.0)  # late verdicts reach the logs
        verdicts = read_verdicts(swarm)  # before the nodes leave: a goodbye is a (true) death
    return {"lifeguard": lifeguard, "requests": dict(outcomes), **verdicts.figures()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="concurrent clients (0: none)")
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--inference", type=int, default=4, help="inference nodes")
    parser.add_argument("--fast", action="store_true", help="the test's fast gossip instead of the defaults")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the load lasts")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument(
        "--stall", nargs=2, type=float, metavar=("STOP_S", "EVERY_S"),
        help="also stop every process STOP_S out of every EVERY_S (SIGSTOP), as the test does",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--only", choices=["on", "off"], help="only with (on) or without (off) local health")
    parser.add_argument("--keep", type=Path, help="keep each run's data and logs under this directory")
    args = parser.parse_args()
    modes = [m for m in (False, True) if args.only in (None, "on" if m else "off")]
    for run in range(args.runs):
        for lifeguard in modes:
            with tempfile.TemporaryDirectory() as workdir:
                directory = args.keep / f"{run}-{'on' if lifeguard else 'off'}" if args.keep else Path(workdir)
                print(json.dumps({"run": run, **asyncio.run(measure(directory, lifeguard, args))}), flush=True)


if __name__ == "__main__":
    main()
