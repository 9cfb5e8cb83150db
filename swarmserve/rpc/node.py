"""The life cycle every service node shares: serve until SIGTERM or SIGINT, drain, release."""

from __future__ import annotations

from swarmserve.rpc.server import RpcServer

__all__ = ["ServiceNode"]


class ServiceNode:
    """A node with one gRPC server. Subclasses set ``server`` and may extend :meth:`start`
    (load models, find peers) and :meth:`close` (release what the server used)."""

    server: RpcServer

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        """Releases resources once the server has stopped."""

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        await self.close()

    async def run(self) -> None:
        """Serves until SIGTERM or SIGINT, then drains and exits."""
        await self.start()
        self.server.stop_on_signals()
        await self.server.wait_for_termination()
        await self.close()
