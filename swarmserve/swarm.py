"""A local swarm on loopback for `swarmserve up` and `make demo`: routers, relays and inference
nodes, each its own process (as they would be on separate machines), with JSON logs in files,
and the ledger's chain: a genesis file (``DATA_DIR/genesis.json``) naming the relays (and the
first router) as validators and one operator account per router, which that router and every
other inference node share (router 1 with inference nodes 1, 3..., router 2 with 2, 4...): each
operator earns when its nodes serve the other's users and pays when the other serves its own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from swarmserve.chain import ChainParameters, Genesis, GenesisAccount, GenesisValidator
from swarmserve.keys import NodeKeys
from swarmserve.overlay import open_descriptor
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, overlay_pb2, router_pb2, router_pb2_grpc

__all__ = [
    "LOCAL_CHAIN",
    "OPERATOR_CREDITS",
    "OPERATOR_STAKE",
    "LocalSwarm",
    "SwarmError",
    "SwarmNode",
    "free_port_block",
]

OPERATOR_CREDITS = 1000
OPERATOR_STAKE = 100
# A fast chain for one machine: 4 blocks a second, cheques settle every 5 s.
LOCAL_CHAIN = ChainParameters(
    block_interval_ms=250, leader_timeout_ms=1000, epoch_blocks=20, appeal_blocks=40, unbonding_blocks=240
)


def free_port_block(size: int, start: int = 23000, stop: int = 40000) -> int:
    """The first port of ``size`` consecutive free loopback ports (for tests and benchmarks)."""
    for base in range(start, stop, size + 7):
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {size} consecutive free ports")


class SwarmError(RuntimeError):
    """The local swarm could not start; the message includes the failing node's last log lines."""


@dataclass(frozen=True)
class SwarmNode:
    name: str
    command: str  # the `swarmserve` sub-command that runs it
    listen: str
    advertise: str | None = None  # where the others reach it, when not where it listens

    @property
    def address(self) -> str:
        return self.advertise or self.listen


# Where a node runs: the command prefix that starts it there (e.g. ``ip netns exec NS``) and the
# address the others reach it at.
Placement = Callable[[SwarmNode], tuple[list[str], str]]


class LocalSwarm:
    """Every node joins through one seed (the first relay, or the first inference node when there
    are no relays), as nodes on separate machines would: nobody is given the member list."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        ports_from: int = 7000,
        relays: int = 3,
        inference_nodes: int = 2,
        inference_env: dict[str, str] | None = None,
        routers: int = 1,
        node_env: dict[str, dict[str, str]] | None = None,
        ledger: bool = True,
        placement: Placement | None = None,
    ) -> None:
        """Routers listen from ``ports_from``, then relays, then inference nodes on the ports after
        (then the validators' consensus ports); routers serve HTTP (the OpenAI API, the dashboard,
        metrics) from ``ports_from + 80``, the other nodes metrics from ``ports_from + 90``.
        ``inference_env`` adds SWARMSERVE_* settings for every inference node, ``node_env`` for
        single nodes by name (``router-1``, ``relay-2``, ``inference-3``...). Without ``ledger``,
        no chain: everything is served for free. ``placement`` runs each node elsewhere (its own
        network namespace, say), reached at the address it returns (``bench/wan.py``)."""
        self.data_dir = data_dir
        self.host = host
        self.inference_env = inference_env or {}
        self.node_env = node_env or {}
        port = iter(range(ports_from, 65536))
        self.routers = [SwarmNode(f"router-{i + 1}", "router", f"{host}:{next(port)}") for i in range(routers)]
        self.relays = [SwarmNode(f"relay-{i + 1}", "relay", f"{host}:{next(port)}") for i in range(relays)]
        self.inference = [
            SwarmNode(f"inference-{i + 1}", "inference", f"{host}:{next(port)}") for i in range(inference_nodes)
        ]
        self._prefix: dict[str, list[str]] = {}
        if placement is not None:

            def placed(node: SwarmNode) -> SwarmNode:
                self._prefix[node.name], address = placement(node)
                return dataclasses.replace(node, advertise=address)

            self.routers = [placed(n) for n in self.routers]
            self.relays = [placed(n) for n in self.relays]
            self.inference = [placed(n) for n in self.inference]
        self.router = self.routers[0].address
        # HTTP (OpenAI API, dashboard, metrics) 80 ports up: clear of the node and consensus ports
        # an existing genesis may hold.
        self.http = {r.name: f"{host}:{ports_from + 80 + i}" for i, r in enumerate(self.routers)}
        self.url = f"http://{self.http[self.routers[0].name]}"
        self.metrics = {n.name: f"{host}:{ports_from + 90 + i}" for i, n in enumerate(self.relays + self.inference)}
        self.seed = (self.relays or self.inference)[0].address
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self.genesis_path: Path | None = None
        self.operators: dict[str, list[str]] = {}  # operator name -> the nodes sharing its account
        if ledger:
            self._write_genesis(port)

    def identity_key(self, name: str) -> bytes:
        """A node's (or an operator's) identity key, created on first use in its data directory."""
        return NodeKeys.load_or_create(self.data_dir / name).identity.public_key

    def _write_genesis(self, port: Iterator[int]) -> None:
        validators = (self.relays + self.routers[:1])[:4] if self.relays else (self.routers + self.inference)[:4]
        for index, router in enumerate(self.routers):
            members = [router.name, *(n.name for i, n in enumerate(self.inference) if i % len(self.routers) == index)]
            self.operators[f"operator-{index + 1}"] = members
        self.genesis_path = self.data_dir / "genesis.json"
        if self.genesis_path.exists():
            return  # the chain goes on where it stopped
        genesis = Genesis(
            name=f"local swarm in {self.data_dir.name}",
            created_unix_ms=int(time.time() * 1000),
            validators=[
                GenesisValidator(key=self.identity_key(v.name).hex(), address=f"{self.host}:{next(port)}")
                for v in validators
            ],
            accounts=[
                GenesisAccount(
                    key=self.identity_key(operator).hex(),
                    credits=OPERATOR_CREDITS,
                    bonded=OPERATOR_STAKE,
                    members=[self.identity_key(m).hex() for m in members],
                )
                for operator, members in self.operators.items()
            ],
            parameters=LOCAL_CHAIN,
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.genesis_path.write_bytes(genesis.encode())

    def _spawn(self, node: SwarmNode) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "SWARMSERVE_DATA_DIR": str(self.data_dir / node.name),
            "SWARMSERVE_LOG__FORMAT": "json",
            **({"SWARMSERVE_GOSSIP__SEEDS": f"[{self.seed}]"} if node.address != self.seed else {}),
            **({"SWARMSERVE_ADVERTISE": node.advertise} if node.advertise else {}),
            **({"SWARMSERVE_LEDGER__GENESIS": str(self.genesis_path)} if self.genesis_path else {}),
            **({"SWARMSERVE_HTTP_LISTEN": self.http[node.name]} if node.name in self.http else {}),
            **({"SWARMSERVE_METRICS_LISTEN": self.metrics[node.name]} if node.name in self.metrics else {}),
            **({"SWARMSERVE_POLICY__MAX_CONCURRENT": "1", **self.inference_env} if node.command == "inference" else {}),
            **self.node_env.get(node.name, {}),
        }
        command = [sys.executable, "-m", "services.cli", node.command, "--listen", node.listen]
        with (logs / f"{node.name}.log").open("ab") as log:
            self._processes[node.name] = subprocess.Popen(
                [*self._prefix.get(node.name, []), *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def _failure(self, name: str) -> SwarmError:
        log = self.data_dir / "logs" / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
        return SwarmError(f"{name} exited at start-up; its log ends:\n" + "\n".join(tail))

    async def start(self, timeout_s: float = 180.0) -> None:
        for node in [*self.relays, *self.inference, *self.routers]:
            self._spawn(node)
        try:
            for router in self.routers:
                await self.wait_until_seen(router.address, len(self.relays) + len(self.inference), timeout_s)
        except SwarmError:
            await self.stop()
            raise

    async def ready_members(self, router: str) -> list[common_pb2.NodeDescriptor]:
        """Members ``router`` holds alive and ready: relays, and inference nodes with models loaded."""
        async with aio.insecure_channel(router) as channel:
            swarm = await router_pb2_grpc.RouterStub(channel).GetSwarm(router_pb2.GetSwarmRequest(), timeout=2)
        descriptors = [
            open_descriptor(m.descriptor) for m in swarm.members if m.state == overlay_pb2.MEMBER_STATE_ALIVE
        ]
        return [d for d in descriptors if common_pb2.NODE_ROLE_RELAY in d.roles or d.models]

    async def wait_until_seen(self, router: str, expected: int, timeout_s: float = 180.0) -> None:
        """Waits until ``router`` holds ``expected`` ready relays and inference nodes."""
        deadline = time.monotonic() + timeout_s
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise self._failure(name)
            with contextlib.suppress(aio.AioRpcError):
                if len(await self.ready_members(router)) >= expected:
                    return
            if time.monotonic() > deadline:
                raise SwarmError(f"the swarm was not ready after {timeout_s:.0f} s (logs in {self.data_dir / 'logs'})")
            await asyncio.sleep(0.3)

    def add_inference(self, port: int, env: dict[str, str] | None = None) -> SwarmNode:
        """Starts one more inference node (it joins through the seed like the others)."""
        node = SwarmNode(f"inference-{len(self.inference) + 1}", "inference", f"{self.host}:{port}")
        self.node_env[node.name] = env or {}
        self.inference.append(node)
        self._spawn(node)
        return node

    def restart(self, name: str) -> None:
        """Starts a node that exited (or was killed) again, with its data directory as it left it."""
        process = self._processes[name]
        if process.poll() is None:
            raise SwarmError(f"{name} is still running")
        self._spawn(next(n for n in [*self.routers, *self.relays, *self.inference] if n.name == name))

    async def generating(self) -> str:
        """The name of an inference node generating now (with one request in flight: its server)."""
        for node in self.inference:
            if self._processes[node.name].poll() is not None:
                continue
            async with aio.insecure_channel(node.address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                status = await stub.Status(inference_pb2.StatusRequest(), timeout=5)
            if status.load.running:
                return node.name
        raise SwarmError("no inference node is generating")

    def signal(self, name: str, sig: signal.Signals) -> None:
        """SIGKILL: the node dies without a word; SIGSTOP/SIGCONT: it hangs (cut off from
        everyone, its connections open but silent) and comes back."""
        self._processes[name].send_signal(sig)

    async def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to every node (routers first), then wait; kill what is left after the grace."""
        order = [n.name for n in [*self.routers, *self.relays, *self.inference]]
        for name in order:
            process = self._processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a paused node must run to stop
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self._processes.values():
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if process.poll() is None:
                process.kill()
                process.wait()
        self._processes.clear()

    def pids(self) -> dict[str, int]:
        """The process ids of the nodes running now, by name."""
        return {name: process.pid for name, process in self._processes.items() if process.poll() is None}

    def exit_codes(self) -> dict[str, int | None]:
        return {name: process.poll() for name, process in self._processes.items()}
