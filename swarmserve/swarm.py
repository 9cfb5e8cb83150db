"""A local swarm on loopback for `swarmserve up` and `make demo`: a router, relays and inference
nodes, each its own process (as they would be on separate machines), with JSON logs in files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from swarmserve.overlay import open_descriptor
from swarmserve.v1 import common_pb2, overlay_pb2, router_pb2, router_pb2_grpc

__all__ = ["LocalSwarm", "SwarmError", "free_port_block"]


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
class _Node:
    name: str
    command: str
    listen: str


class LocalSwarm:
    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        ports_from: int = 7000,
        relays: int = 3,
        inference_nodes: int = 2,
        inference_env: dict[str, str] | None = None,
    ) -> None:
        """The router listens on ``ports_from``; relays and then inference nodes on the ports
        after it. ``inference_env`` adds SWARMSERVE_* settings for the inference nodes."""
        self.data_dir = data_dir
        self.inference_env = inference_env or {}
        self.router = f"{host}:{ports_from}"
        self.relays = [_Node(f"relay-{i + 1}", "relay", f"{host}:{ports_from + 1 + i}") for i in range(relays)]
        self.inference = [
            _Node(f"inference-{i + 1}", "inference", f"{host}:{ports_from + 1 + relays + i}")
            for i in range(inference_nodes)
        ]
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, node: _Node, extra_env: dict[str, str]) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "SWARMSERVE_DATA_DIR": str(self.data_dir / node.name),
            "SWARMSERVE_LOG__FORMAT": "json",
            **extra_env,
        }
        with (logs / f"{node.name}.log").open("wb") as log:
            self._processes[node.name] = subprocess.Popen(
                [sys.executable, "-m", "swarmserve.cli", node.command, "--listen", node.listen],
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
        for node in self.relays:
            self._spawn(node, {})
        for node in self.inference:
            self._spawn(node, {"SWARMSERVE_POLICY__MAX_CONCURRENT": "1", **self.inference_env})
        peers = ", ".join(n.listen for n in [*self.relays, *self.inference])
        self._spawn(_Node("router", "router", self.router), {"SWARMSERVE_PEERS": f"[{peers}]"})
        expected = len(self.relays) + len(self.inference)
        deadline = time.monotonic() + timeout_s
        async with aio.insecure_channel(self.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            while True:
                for name, process in self._processes.items():
                    if process.poll() is not None:
                        await self.stop()
                        raise self._failure(name)
                with contextlib.suppress(aio.AioRpcError):
                    swarm = await stub.GetSwarm(router_pb2.GetSwarmRequest(), timeout=2)
                    descriptors = [
                        open_descriptor(m.descriptor)
                        for m in swarm.members
                        if m.state == overlay_pb2.MEMBER_STATE_ALIVE
                    ]
                    # Relays are ready when they answer; inference nodes once their models load.
                    ready = [d for d in descriptors if common_pb2.NODE_ROLE_RELAY in d.roles or d.models]
                    if len(ready) >= expected:
                        return
                if time.monotonic() > deadline:
                    await self.stop()
                    raise SwarmError(
                        f"the swarm was not ready after {timeout_s:.0f} s (logs in {self.data_dir / 'logs'})"
                    )
                await asyncio.sleep(0.3)

    async def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to every node (router first), then wait; kill what is left after the grace."""
        order = ["router", *[n.name for n in self.relays], *[n.name for n in self.inference]]
        for name in order:
            process = self._processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self._processes.values():
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if process.poll() is None:
                process.kill()
                process.wait()
        self._processes.clear()

    def exit_codes(self) -> dict[str, int | None]:
        return {name: process.poll() for name, process in self._processes.items()}
