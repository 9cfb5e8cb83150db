"""The life cycle every service node shares: join the swarm, serve until SIGTERM or SIGINT,
leave, drain, release."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from starlette.applications import Starlette

from swarmserve import native
from swarmserve.chain import ChainReplica, chain_binding, load_genesis
from swarmserve.http import HttpServer
from swarmserve.rpc.channels import ChannelPool
from swarmserve.rpc.server import RpcServer, ServiceBinding
from swarmserve.telemetry.metrics import NodeMetrics, metrics_route
from swarmserve.trust import ChainReputation
from swarmserve.v1 import overlay_pb2

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
    metrics_http: HttpServer | None = None  # with ``metrics_listen``

    @cached_property
    def metrics(self) -> NodeMetrics:
        """This node's metrics; the first use (in the subclass's ``__init__``, after
        :meth:`open_ledger`) registers what every node reports: gossip and the ledger."""
        metrics = NodeMetrics()
        membership, chain = self.membership, self.chain
        counters = membership.counters
        metrics.read(
            "swarmserve_gossip_members",
            "members this node knows, by state",
            lambda: {
                (overlay_pb2.MemberState.Name(state).removeprefix("MEMBER_STATE_").lower(),): float(
                    sum(1 for peer in membership.directory.peers() if peer.state == state)
                )
                for state in overlay_pb2.MemberState.values()
                if state
            },
            ["state"],
        )
        metrics.read_counter(
            "swarmserve_gossip_probes", "protocol periods that probed a member", lambda: counters.probes
        )
        metrics.read_counter(
            "swarmserve_gossip_probe_failures",
            "probes neither the member nor any helper answered (the member became suspect)",
            lambda: counters.probe_failures,
        )
        metrics.read_counter(
            "swarmserve_gossip_messages_sent", "Swim and Exchange messages sent", lambda: counters.messages_sent
        )
        metrics.read_counter(
            "swarmserve_gossip_bytes",
            "gossip bytes sent and received (rate() gives bytes per period)",
            lambda: {("sent",): counters.bytes_sent, ("received",): counters.bytes_received},
            ["direction"],
        )
        metrics.read(
            "swarmserve_gossip_health_score",
            "Lifeguard's local health: 0 when healthy; probe and suspicion timeouts are multiplied by score + 1",
            lambda: counters.health_score,
        )
        metrics.read_counter(
            "swarmserve_gossip_late_loops", "times this node's event loop was found late", lambda: counters.late_loop
        )
        metrics.read_counter(
            "swarmserve_gossip_refutations", "suspicions about this node it refuted", lambda: counters.refutations
        )
        if chain is not None:
            self_key = chain.identity.public_key
            metrics.read(
                "swarmserve_ledger_height", "the height of this node's replica of the chain", lambda: chain.state.height
            )
            metrics.read(
                "swarmserve_ledger_balance_credits",
                "this node's account: credits available and bonded (staked)",
                lambda: {
                    ("available",): (account := chain.state.account(self_key)).available,
                    ("bonded",): account.bonded,
                },
                ["kind"],
            )
            metrics.read_counter(
                "swarmserve_ledger_rejected_transactions",
                "transactions refused at submission here, or void or failed in applied blocks",
                lambda: chain.rejected,
                ["reason"],
            )
        return metrics

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
                resend_after_s=config.ledger.resend_after_s,
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

    def serve_metrics(self, listen: str | None) -> None:
        """Serves ``/metrics`` on ``listen`` (HOST:PORT) from :meth:`join_swarm` on."""
        if listen:
            self.metrics_http = HttpServer(Starlette(routes=[metrics_route(self.metrics)]), listen)

    async def join_swarm(self) -> int:
        """Joins through the configured seeds and starts gossiping; returns how many answered."""
        if self.metrics_http is not None:
            await self.metrics_http.start()
        answered = await self.membership.join()
        self.membership.start()
        if self.chain is not None:
            await self.chain.start()
        return answered

    async def close(self) -> None:
        """Releases resources once the server has stopped."""

    async def _release(self) -> None:
        if self.metrics_http is not None:
            await self.metrics_http.stop()
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
