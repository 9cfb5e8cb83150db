"""The WAN testbed: hop costs measured across emulated internet delays instead of loopback.

Every node runs in its own network namespace (iproute2 ``ip netns``) with its own address on one
bridge (a veth pair each: ``10.11.0.1``, ``10.12.0.1``...; this process, the clients, at
``10.0.0.1``).
This kernel has no ``netem`` qdisc (nor ``fq``, nor a BPF compiler), so the delay is added in
user space: in each namespace a proxy (``bench/delay_proxy.py``) stands in front of the node
(the node listens on the namespace's loopback, the proxy on its address, published as the
node's), releasing every byte ``delay`` (+- ``jitter``, order kept) after it came, both ways: a
connection from A to B crosses B's proxy only, so the one-way delay between any two nodes,
clients included, is ``delay``.

Swarm: 2 routers (router-1 keeps its circuit pool, router-2 has none), 5 relays, 2 inference
nodes on the EMULATED engine (20 ms a token), no ledger, the link data plane. For each one-way
delay (20 and 60 ms by default, jitter 10% of it) and hop count (0, 1, 3, 5): ``--requests``
single streams of 32 tokens through each router, alternating, a pause between them for the pool
to refill; TTFT (request sent to first token) and decode tokens/s (tokens after the first over
the time after it) medians with 95% bootstrap intervals, and the pool's paired TTFT difference.
What to expect: without the pool, set-up (2 (h+1) delays), request and first token (2 (h+1))
plus the client's round trip to the router; with it, the set-up leaves that path.

Needs root and ``ip netns`` (skips with the reason otherwise). Writes ``bench/results/wan.json``
and ``wan.png``; ``--quick``: 20 ms only, 5 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402

from bench.streams import interval  # noqa: E402
from swarmserve.swarm import LocalSwarm, SwarmNode, free_port_block  # noqa: E402
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODEL = "emulated-wan"
BRIDGE, PREFIX = "sswan0", "sswan"
# One on-link /8, each node in a /16 of its own: path choice never puts two hops of one /16 in a
# circuit (loopback is exempt, these addresses are not), as it would not across the internet.
CLIENTS = "10.0.0.1"
RELAYS, INFERENCE_NODES, TOKENS = 5, 2, 32


def unavailable() -> str | None:
    """Why the testbed cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    probe = f"{PREFIX}-probe"
    steps = [
        ["ip", "netns", "add", probe],
        ["ip", "link", "add", f"{PREFIX}probe", "type", "bridge"],
        ["ip", "link", "add", f"{PREFIX}vprobe", "type", "veth", "peer", "name", "eth0", "netns", probe],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                return f"{' '.join(step[:4])} failed: {done.stderr.strip()}"
    finally:
        for cleanup in (["ip", "link", "del", f"{PREFIX}vprobe"], ["ip", "link", "del", f"{PREFIX}probe"]):
            subprocess.run(cleanup, capture_output=True)
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


class Testbed:
    """Namespaces, veths and the bridge; a delay proxy in front of each node."""

    def __init__(self, delay_ms: float, jitter_ms: float, workdir: Path) -> None:
        self.delay_ms, self.jitter_ms, self.workdir = delay_ms, jitter_ms, workdir
        self.hosts: dict[str, str] = {}  # node name -> its namespace's address
        self.proxies: list[subprocess.Popen[bytes]] = []

    def up(self) -> None:
        self.down()  # what an interrupted run left
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{CLIENTS}/8", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        # Bridged frames pass iptables' FORWARD chain where br_netfilter is loaded, and a host
        # with Docker drops them there by default.
        self._forwarding("-I")

    def place(self, node: SwarmNode) -> tuple[list[str], str]:
        """LocalSwarm's placement: the node in a namespace of its own, behind its proxy."""
        index = len(self.hosts) + 1
        namespace, host = f"{PREFIX}-{index}", f"10.{10 + index}.0.1"
        self.hosts[node.name] = host
        ip("netns", "add", namespace)
        ip("link", "add", f"{PREFIX}v{index}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("link", "set", f"{PREFIX}v{index}", "master", BRIDGE, "up")
        ip("addr", "add", f"{host}/8", "dev", "eth0", namespace=namespace)
        ip("link", "set", "eth0", "up", namespace=namespace)
        ip("link", "set", "lo", "up", namespace=namespace)
        port = node.listen.rsplit(":", 1)[1]
        log = (self.workdir / f"proxy-{node.name}.log").open("ab")
        proxy = [sys.executable, "-m", "bench.delay_proxy", "--listen", f"{host}:{port}", "--to", node.listen]
        delay = ["--delay-ms", str(self.delay_ms), "--jitter-ms", str(self.jitter_ms)]
        self.proxies.append(
            subprocess.Popen(
                ["ip", "netns", "exec", namespace, *proxy, *delay],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return ["ip", "netns", "exec", namespace], f"{host}:{port}"

    def down(self) -> None:
        for proxy in self.proxies:
            proxy.kill()
            proxy.wait()
        self.proxies.clear()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in listed:
            if name.startswith(f"{PREFIX}-"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():  # a veth outlives its namespace while a process holds it
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(f"{PREFIX}v"):
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        self._forwarding("-D")

    @staticmethod
    def _forwarding(action: str) -> None:
        for tool in ("iptables", "iptables-legacy"):
            if shutil.which(tool):
                rule = ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]
                subprocess.run([tool, "-w", action, *rule], capture_output=True)


@contextmanager
def testbed(delay_ms: float, jitter_ms: float, workdir: Path) -> Iterator[Testbed]:
    bed = Testbed(delay_ms, jitter_ms, workdir)
    bed.up()
    try:
        yield bed
    finally:
        bed.down()


def ci95(values: list[float]) -> list[float]:
    return [round(bound, 1) for bound in interval(values)]


async def one_stream(stub: router_pb2_grpc.RouterStub, hops: int, index: int) -> tuple[float, float]:
    """TTFT (ms) and decode tokens/s of one 32-token stream."""
    request = router_pb2.GenerateRequest(
        model=MODEL,
        prompt=f"wan probe {index}",
        privacy=router_pb2.PrivacyOptions(hops=hops),
        sampling=common_pb2.SamplingParams(max_new_tokens=TOKENS, seed=index),
    )
    started = time.monotonic()
    first = last = None
    tokens = 0
    async for reply in stub.Generate(request, timeout=120):
        if reply.HasField("token"):
            now = time.monotonic()
            first = first or now
            last = now
            tokens += len(reply.token.token_ids)
    assert first is not None and last is not None
    return (first - started) * 1000, (tokens - 1) / (last - first) if last > first else 0.0


async def measure(delay_ms: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    jitter_ms = delay_ms * 0.1
    timing = "{prefill_us_per_token: 200, decode_us_per_token: 20000, batch_slowdown: 0}"
    inference = {"SWARMSERVE_MODELS": f"[{{name: {MODEL}, engine: emulated, emulated: {timing}}}]"}
    everyone = {"SWARMSERVE_CIRCUITS__SETUPS_PER_SOURCE_PER_S": "1000"}  # all come through one proxy
    router = {"SWARMSERVE_DUELS__RATE": "0", "SWARMSERVE_AUDITS__RATE": "0"}
    with testbed(delay_ms, jitter_ms, workdir) as bed:
        swarm = LocalSwarm(
            workdir / f"swarm-{delay_ms:g}ms",
            ports_from=free_port_block(100),
            relays=RELAYS,
            inference_nodes=INFERENCE_NODES,
            routers=2,
            ledger=False,
            placement=bed.place,
            node_env={f"relay-{i + 1}": everyone for i in range(RELAYS)}
            | {f"inference-{i + 1}": everyone | inference for i in range(INFERENCE_NODES)}
            | {"router-1": router, "router-2": router | {"SWARMSERVE_CIRCUIT_POOL__ENABLED": "false"}},
        )
        print(f"wan: {delay_ms:g} ms one way (+-{jitter_ms:g}): starting the swarm in namespaces", flush=True)
        await swarm.start(timeout_s=240)
        channels = [aio.insecure_channel(r.address) for r in swarm.routers]
        stubs = {"pool": router_pb2_grpc.RouterStub(channels[0]), "no_pool": router_pb2_grpc.RouterStub(channels[1])}
        rows = []
        try:
            for hops in args.hops:
                for stub in stubs.values():  # the pool learns this hop count; paths warm
                    await one_stream(stub, hops, 0)
                await asyncio.sleep(1.0 + 4 * (hops + 1) * delay_ms / 1000)
                seen: dict[str, list[tuple[float, float]]] = {"pool": [], "no_pool": []}
                for index in range(1, args.requests + 1):
                    for name in seen if index % 2 else reversed(list(seen)):
                        seen[name].append(await one_stream(stubs[name], hops, index))
                    await asyncio.sleep(0.5 + 4 * (hops + 1) * delay_ms / 1000)  # the pool refills
                row: dict[str, Any] = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "hops": hops}
                for name, values in seen.items():
                    ttft, rate = [v[0] for v in values], [v[1] for v in values]
                    row[name] = {
                        "ttft_ms": round(statistics.median(ttft), 1),
                        "ttft_ci95": ci95(ttft),
                        "tokens_per_s": round(statistics.median(rate), 1),
                        "tokens_per_s_ci95": ci95(rate),
                    }
                differences = [p[0] - n[0] for p, n in zip(seen["pool"], seen["no_pool"], strict=True)]
                row["pool_minus_no_pool_ttft_ms"] = {
                    "median": round(statistics.median(differences), 1),
                    "ci95": ci95(differences),
                }
                rows.append(row)
                print(
                    f"  {delay_ms:g} ms, {hops} hops: TTFT {row['pool']['ttft_ms']} ms with the pool "
                    f"{row['pool']['ttft_ci95']}, {row['no_pool']['ttft_ms']} without {row['no_pool']['ttft_ci95']}; "
                    f"decode {row['pool']['tokens_per_s']} / {row['no_pool']['tokens_per_s']} tokens/s",
                    flush=True,
                )
        finally:
            for channel in channels:
                await channel.close(None)
            await swarm.stop()
    return {"delay_ms": delay_ms, "rows": rows}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), squeeze=False)
    for axis, run in zip(axes[0], runs, strict=True):
        for name, colour in (("pool", "tab:green"), ("no_pool", "tab:red")):
            hops = [r["hops"] for r in run["rows"]]
            medians = [r[name]["ttft_ms"] for r in run["rows"]]
            low = [m - r[name]["ttft_ci95"][0] for m, r in zip(medians, run["rows"], strict=True)]
            high = [r[name]["ttft_ci95"][1] - m for m, r in zip(medians, run["rows"], strict=True)]
            axis.errorbar(hops, medians, yerr=[low, high], marker="o", capsize=4, color=colour, label=name)
        axis.set(xlabel="relays (hops)", ylabel="TTFT ms (median, 95% CI)", title=f"{run['delay_ms']:g} ms one way")
        axis.legend()
    figure.suptitle("WAN testbed: every node in its own namespace, delay on every link")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[20.0, 60.0])
    parser.add_argument("--hops", type=int, nargs="+", default=[0, 1, 3, 5])
    parser.add_argument("--requests", type=int, default=12, help="single streams per router and point")
    parser.add_argument("--quick", action="store_true", help="20 ms only, 5 requests")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = parser.parse_args()
    if (reason := unavailable()) is not None:
        print(f"wan: skipped: {reason}")
        return 0
    if args.quick:
        args.delays_ms, args.requests = [20.0], 5
    out = args.out or (Path(tempfile.mkdtemp(prefix="wan-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wan-swarm-") as workdir:
        runs = [asyncio.run(measure(delay, args, Path(workdir))) for delay in args.delays_ms]
    results = {
        "setup": {
            "routers": "router-1 with the circuit pool, router-2 without",
            "relays": RELAYS,
            "inference_nodes": INFERENCE_NODES,
            "engine": "EMULATED: 20 ms a token",
            "tokens_per_stream": TOKENS,
            "requests_per_router_and_point": args.requests,
            "delay": "user-space proxy per node (no netem in this kernel); one-way delay between any two nodes",
            "data_plane": "link",
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
        },
        "runs": runs,
    }
    (out / "wan.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(runs, out / "wan.png")
    print(f"wrote {out / 'wan.json'} and {out / 'wan.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
