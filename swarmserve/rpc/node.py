"""The life cycle every service node shares: join the swarm, serve until SIGTERM or SIGINT,
leave, drain, release."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmserve import native
from swarmserve.ledger import LedgerReplica
from swarmserve.ledger.servicer import ledger_binding
from swarmserve.ledger.sync import LedgerSync
from swarmserve.rpc.channels import ChannelPool
from swarmserve.rpc.server import RpcServer, ServiceBinding

if TYPE_CHECKING:
    from swarmserve.config import NodeConfig
    from swarmserve.overlay import Membership

__all__ = ["ServiceNode"]


class ServiceNode:
    """A node with one gRPC server, its membership in the swarm and its ledger replica.
    Subclasses set ``membership``, call :meth:`open_ledger` and set ``server`` (with the binding
    it returns), and may extend :meth:`start` (load models) and :meth:`close` (release what the
    server used)."""

    server: RpcServer
    membership: Membership
    ledger: LedgerReplica
    ledger_sync: LedgerSync

    def open_ledger(self, config: NodeConfig, channels: ChannelPool, identity: native.Identity) -> ServiceBinding:
        """Opens ``data_dir/ledger.sqlite3`` (writing this node's joining grant if its chain is
        empty); returns the Ledger service binding for the server."""
        self.ledger = LedgerReplica(config.data_dir / "ledger.sqlite3")
        self.ledger.ensure_grant(identity)
        self.ledger_sync = LedgerSync(self.ledger, self.membership.directory, channels, config.ledger.sync_interval_s)
        return ledger_binding(self.ledger)

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
        self.ledger_sync.start()
        return answered

    async def close(self) -> None:
        """Releases resources once the server has stopped."""

    async def _release(self) -> None:
        await self.ledger_sync.close()
        self.ledger.close()
        await self.close()

    async def stop(self, grace_s: float | None = None) -> None:
        await self.membership.close()
        await self.server.stop(grace_s)
        await self._release()

    async def run(self) -> None:
        """Serves until SIGTERM or SIGINT, then leaves the swarm, drains and exits."""
        await self.start()
        self.server.stop_on_signals(on_signal=self.membership.close)
        await self.server.wait_for_termination()
        await self._release()
