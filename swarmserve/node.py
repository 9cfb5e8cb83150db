"""The life cycle every service node shares: join the swarm, serve until SIGTERM or SIGINT,
leave, drain, release."""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmserve import native
from swarmserve.chain import ChainReplica, chain_binding, load_genesis
from swarmserve.rpc.channels import ChannelPool
from swarmserve.rpc.server import RpcServer, ServiceBinding
from swarmserve.trust import ChainReputation

if TYPE_CHECKING:
    from swarmserve.config import NodeConfig
    from swarmserve.overlay import Membership

__all__ = ["ServiceNode"]


class ServiceNode:
    """A node with one gRPC server, its membership in the swarm and, in a swarm with a ledger
    (a genesis file), its replica of the ledger's chain and the reputation read from it.
    Subclasses set ``membership``, call :meth:`open_ledger` and set ``server`` (with the bindings
    it returns), and may extend :meth:`start` (load models) and :meth:`close` (release what the
    server used)."""

    server: RpcServer
    membership: Membership
    chain: ChainReplica | None = None
    trust: ChainReputation

    def open_ledger(self, config: NodeConfig, channels: ChannelPool, identity: native.Identity) -> list[ServiceBinding]:
        """With a genesis file configured, opens this node's replica of the ledger's chain
        (``data_dir/chain.sqlite3``); returns its service bindings for the server. Without one,
        the swarm has no ledger: nothing is paid, and every provider stands at the initial
        reputation."""
        bindings = []
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
        self.trust = ChainReputation(self.chain.state if self.chain is not None else None)
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
        if self.chain is not None:
            await self.chain.start()
        return answered

    async def close(self) -> None:
        """Releases resources once the server has stopped."""

    async def _release(self) -> None:
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
