"""The life cycle every service node shares: join the swarm, serve until SIGTERM or SIGINT,
leave, drain, release."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmserve.rpc.server import RpcServer

if TYPE_CHECKING:
    from swarmserve.overlay import Membership

__all__ = ["ServiceNode"]


class ServiceNode:
    """A node with one gRPC server and its membership in the swarm. Subclasses set ``server``
    and ``membership`` and may extend :meth:`start` (load models) and :meth:`close` (release
    what the server used)."""

    server: RpcServer
    membership: Membership

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await self.server.start()
        await self.join_swarm()

    async def join_swarm(self) -> int:
        """Joins through the configured seeds and starts gossiping; returns how many answered."""
        answered = await self.membership.join()
        self.membership.start()
        return answered

    async def close(self) -> None:
        """Releases resources once the server has stopped."""

    async def stop(self, grace_s: float | None = None) -> None:
        await self.membership.close()
        await self.server.stop(grace_s)
        await self.close()

    async def run(self) -> None:
        """Serves until SIGTERM or SIGINT, then leaves the swarm, drains and exits."""
        await self.start()
        self.server.stop_on_signals(on_signal=self.membership.close)
        await self.server.wait_for_termination()
        await self.close()
