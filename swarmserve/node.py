"""The life cycle every service node shares: join the swarm, serve until SIGTERM or SIGINT,
leave, drain, release."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from swarmserve import native
from swarmserve.chain import ChainReplica, chain_binding, load_genesis
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
    Subclasses set ``membership``, call :meth:`open_ledger` and set ``server`` (with the bindings
    it returns), and may extend :meth:`start` (load models) and :meth:`close` (release what the
    server used)."""

    server: RpcServer
    membership: Membership
    ledger: LedgerReplica
    ledger_sync: LedgerSync
    chain: ChainReplica | None = None

    def open_ledger(self, config: NodeConfig, channels: ChannelPool, identity: native.Identity) -> list[ServiceBinding]:
        """Opens ``data_dir/ledger.sqlite3`` (writing this node's joining grant if its chain is
        empty) and, with a genesis file configured, this node's replica of the chain; returns
        their service bindings for the server."""
        self.ledger = LedgerReplica(config.data_dir / "ledger.sqlite3")
        self.ledger.ensure_grant(identity)
        self.ledger_sync = LedgerSync(self.ledger, self.membership.directory, channels, config.ledger.sync_interval_s)
        bindings = [ledger_binding(self.ledger)]
        if config.ledger.genesis is not None:
            genesis, genesis_bytes = load_genesis(config.ledger.genesis)
            self.chain = ChainReplica(
                config.data_dir,
                genesis,
                genesis_bytes,
                identity,
                self.membership.directory,
                channels,
                consensus_listen=config.ledger.consensus_listen,
                sync_interval_s=config.ledger.chain_sync_interval_s,
            )
            bindings.append(chain_binding(self.chain))
        return bindings

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
        if self.chain is not None:
            await asyncio.to_thread(self.chain.start) if self.chain.validator else self.chain.start()
        return answered

    async def close(self) -> None:
        """Releases resources once the server has stopped."""

    async def _release(self) -> None:
        await self.ledger_sync.close()
        self.ledger.close()
        if self.chain is not None:
            await self.chain.close()
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
