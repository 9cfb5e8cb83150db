"""The gRPC server bootstrap every service uses: ``grpc.aio``, standard health checking (SERVING
only once started, NOT_SERVING while draining), server reflection (so ``grpcurl`` can list,
describe and call), the error interceptor, and graceful shutdown on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from swarmserve.config import ServerSettings
from swarmserve.rpc.channels import KEEPALIVE_SERVER_OPTIONS
from swarmserve.rpc.interceptor import ErrorInterceptor
from swarmserve.telemetry import get_logger

__all__ = ["RpcServer", "ServiceBinding"]

log = get_logger("swarmserve.rpc")


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer to serve: its full name (``swarmserve.v1.Router``) and how to add it."""

    name: str
    add_to_server: Callable[[aio.Server], None]


class RpcServer:
    """One gRPC server for one or more services of a node."""

    def __init__(self, settings: ServerSettings, services: Sequence[ServiceBinding]) -> None:
        self._settings = settings
        self._services = list(services)
        # grpc-stubs does not describe the asyncio health servicer.
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        """The bound ``host:port`` (the real port when 0 was asked for)."""
        if self.port is None:
            raise RuntimeError("server is not started")
        host = self._settings.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def start(self, *, serving: bool = True) -> None:
        """Binds and starts. With ``serving=False`` health reports NOT_SERVING until
        :meth:`mark_serving` (a node that must load a model first)."""
        limit = self._settings.max_message_bytes
        server = aio.server(
            interceptors=[ErrorInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a port another process holds fails the start, not shared
                *KEEPALIVE_SERVER_OPTIONS,
            ],
        )
        for service in self._services:
            service.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [s.name for s in self._services]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = server.add_insecure_port(self._settings.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self._settings.listen}")
        await server.start()
        self._server, self.port = server, port
        if serving:
            await self.mark_serving()
        else:
            for name in ["", *names]:
                await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            log.info("listening, not serving yet", address=self.address, services=names)

    async def mark_serving(self) -> None:
        """Health reports SERVING for the node and each of its services."""
        names = [s.name for s in self._services]
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", address=self.address, services=names)

    async def stop(self, grace_s: float | None = None) -> None:
        """Reports NOT_SERVING, lets running calls finish for the grace period, then stops."""
        if self._server is None:
            return
        grace = self._settings.grace_period_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        log.info("draining", address=self.address, grace_period_s=grace)
        await self._server.stop(grace)
        log.info("stopped", address=self.address)

    def stop_on_signals(
        self,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
        on_signal: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Starts a graceful stop when one of ``signals`` arrives (call from the event loop),
        after ``on_signal`` (a node leaving the swarm, say) has run."""
        loop = asyncio.get_running_loop()

        async def stop() -> None:
            if on_signal is not None:
                await on_signal()
            await self.stop()

        def request_stop(sig: signal.Signals) -> None:
            log.info("signal received", signal=sig.name)
            if self._stopping is None:
                self._stopping = loop.create_task(stop())

        for sig in signals:
            loop.add_signal_handler(sig, request_stop, sig)

    async def wait_for_termination(self) -> None:
        if self._server is None:
            raise RuntimeError("server is not started")
        await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping
