"""Runs an inference node: keys, engines, the gRPC server, graceful shutdown.

Start-up order matters for orchestrators: the port opens first with health NOT_SERVING, the
models load (the slow part), and only then does health say SERVING. On SIGTERM the node reports
NOT_SERVING, lets running streams finish within the grace period, then ends the rest cleanly.
"""

from __future__ import annotations

import asyncio
import time

from services.inference.billing import Billing
from services.inference.config import InferenceConfig, ModelSettings
from services.inference.emulated import EmulatedEngine
from services.inference.engine import Engine
from services.inference.exit import InferenceExit
from services.inference.models import default_model_path
from services.inference.offload import Offloader
from services.inference.service import InferenceService
from services.inference.servicer import InferenceServicer, capacity, load_report, model_info, policy_summary
from services.inference.tokens import TokenDesk
from services.relay.client import circuit_opener
from services.relay.links import LinkPlane
from services.relay.servicer import RelayServicer
from services.verifier.appeals import AppealDuties
from services.verifier.service import VerifierService
from services.verifier.servicer import VerifierServicer
from swarmserve.chain.evidence import verdict_id
from swarmserve.keys import NodeKeys
from swarmserve.node import ServiceNode
from swarmserve.overlay import DescriptorPublisher, Membership, overlay_binding
from swarmserve.rpc import ChannelPool, RpcServer, ServiceBinding, ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.v1 import chain_pb2, common_pb2, inference_pb2_grpc, relay_pb2_grpc, verifier_pb2, verifier_pb2_grpc

__all__ = ["InferenceNode", "load_engine"]

log = get_logger("swarmserve.inference")


async def load_engine(settings: ModelSettings, slots: int) -> Engine:
    """Loads one configured model (blocking loads run off the event loop)."""
    if settings.engine == "emulated":
        timing = settings.emulated
        return EmulatedEngine(
            settings.name,
            slots=slots,
            prefill_us_per_token=timing.prefill_us_per_token,
            decode_us_per_token=timing.decode_us_per_token,
            batch_slowdown=timing.batch_slowdown,
            prefix_cache_chunks=timing.prefix_cache_chunks,
            vocab_size=timing.vocab_size,
            context_length=settings.context_length,
        )
    if settings.engine == "tensorrt-llm":
        from services.inference.tensorrt_engine import TensorRTEngine  # optional: GPU only

        assert settings.path is not None  # the config requires it for this engine
        return await asyncio.to_thread(
            TensorRTEngine, settings.path, settings.name, context_length=settings.context_length
        )
    from services.inference.llama_engine import LlamaCppEngine

    path = settings.path or default_model_path()
    return await asyncio.to_thread(
        LlamaCppEngine,
        path,
        settings.name,
        slots=slots,
        context_length=settings.context_length,
        threads=settings.threads,
    )


class InferenceNode(ServiceNode):
    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.keys = NodeKeys.load_or_create(config.data_dir, config.identity_pem())
        self.onion_keys = config.circuits.onion_keys()
        self.servicer = InferenceServicer()
        self.verifier = VerifierServicer()
        self.appeals: AppealDuties | None = None  # verifier nodes with a ledger
        self.channels = ChannelPool(config.server.max_message_bytes)
        self.publisher = DescriptorPublisher(
            self.keys.identity,
            [common_pb2.NODE_ROLE_INFERENCE, *([common_pb2.NODE_ROLE_VERIFIER] if config.verifier else [])],
            lambda: config.advertise or self.server.address,
            onion_keys=self.onion_keys,
            fill=self._describe,
        )
        self.membership = Membership(self.publisher, self.channels, config.gossip)
        self.links = LinkPlane(self.channels, idle_timeout_s=config.circuits.idle_timeout_s)
        self.offloader = (
            Offloader(
                self.keys.identity.public_key,
                self.stake_of,
                self.membership,
                circuit_opener(config.circuits.data_plane, self.channels, self.links),
                config.circuits.setup_timeout_s,
                config.circuits.idle_timeout_s,
            )
            if config.offload
            else None
        )
        # The node terminates onion circuits (never forwards them): requests arrive through
        # relays, and only this node sees their plaintext.
        self.terminus = InferenceExit(lambda: self.servicer.service, self.offloader)
        self.exit = RelayServicer(
            self.onion_keys,
            config.circuits,
            self.channels,
            terminus=self.terminus,
            forwards=False,
            directory=self.membership.directory,  # members' addresses get a larger set-up allowance
            links=self.links,
        )
        self.server = RpcServer(
            config.server,
            [
                ServiceBinding(
                    "swarmserve.v1.Inference",
                    lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(self.servicer, server),
                ),
                ServiceBinding(
                    "swarmserve.v1.Relay",
                    lambda s: relay_pb2_grpc.add_RelayServicer_to_server(self.exit, s),
                ),
                overlay_binding(self.membership),
                *self.open_ledger(config, self.channels, self.keys.identity),
                *(
                    [
                        ServiceBinding(
                            "swarmserve.v1.Verifier",
                            lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(self.verifier, s),
                        )
                    ]
                    if config.verifier
                    else []
                ),
            ],
        )
        self.model_load_s: dict[str, float] = {}
        self._report_metrics()
        self.serve_metrics(config.metrics_listen)

    def _report_metrics(self) -> None:
        """What an inference node reports besides gossip and the ledger (``ServiceNode.metrics``):
        its slots and queue, offloads, model loading, and its verdicts; generation timings are
        recorded by the service as it generates."""
        metrics, terminus = self.metrics, self.terminus
        self.exit.report_to(metrics)

        def running() -> int:
            service = self.servicer.service
            return 0 if service is None else service.load().running

        def queued() -> int:
            service = self.servicer.service
            return 0 if service is None else service.load().queued

        def slots() -> int:
            service = self.servicer.service
            return 0 if service is None else service.admission.max_concurrent

        metrics.read("swarmserve_inference_queue_depth", "requests waiting for a slot", queued)
        metrics.read("swarmserve_inference_running_requests", "requests generating now", running)
        metrics.read("swarmserve_inference_slots", "requests this node generates at once at most", slots)
        metrics.read(
            "swarmserve_inference_slot_utilization_ratio",
            "running requests over slots",
            lambda: running() / (slots() or 1),
        )
        metrics.read_counter(
            "swarmserve_inference_offloads",
            "requests passed on to a peer with a free slot (sent) or taken from a busy one (received)",
            lambda: terminus.offloads,
            ["direction"],
        )
        metrics.read(
            "swarmserve_inference_model_load_seconds",
            "how long loading each model took at start",
            lambda: self.model_load_s,
            ["model"],
        )
        metrics.read_counter(
            "swarmserve_verifier_verdicts",
            "re-execution checks (check) and duel votes (duel) this node gave, by outcome",
            lambda: {
                key: float(n) for key, n in (self.verifier.service.outcomes if self.verifier.service else {}).items()
            },
            ["kind", "outcome"],
        )

    def stake_of(self, key: bytes) -> int:
        """Bonded credits of ``key``'s account (0 without a ledger)."""
        return self.chain.state.account(key).bonded if self.chain is not None else 0

    def _describe(self, descriptor: common_pb2.NodeDescriptor) -> None:
        """Models, capacity, load and policy, once the models are loaded."""
        service = self.servicer.service
        if service is None:
            return
        descriptor.models.extend(model_info(engine.identity) for engine in service.engines.values())
        descriptor.capacity.CopyFrom(capacity(service.policy))
        descriptor.load.CopyFrom(load_report(service.load()))
        descriptor.policy.CopyFrom(policy_summary(service.policy, service.requires_caller))
        descriptor.price.CopyFrom(common_pb2.Price(**self.config.price.model_dump()))
        if service.billing is not None and service.billing.bills:
            descriptor.token_key = service.billing.desk.public_key

    async def start(self) -> None:
        await self.server.start(serving=False)
        engines: dict[str, Engine] = {}
        try:
            for settings in self.config.models:
                started = time.monotonic()
                log.info(
                    "loading model",
                    model=settings.name,
                    engine=settings.engine,
                    path=str(settings.path or "embedded"),
                )
                engine = await load_engine(settings, self.config.policy.max_concurrent)
                identity = engine.identity
                log.info(
                    "model loaded",
                    model=identity.name,
                    quantization=identity.quantization,
                    weights_digest=identity.weights_digest.hex()[:16],
                    seconds=round(time.monotonic() - started, 2),
                )
                engines[settings.name] = engine
                self.model_load_s[settings.name] = time.monotonic() - started
        except BaseException:
            for engine in engines.values():
                await engine.close()
            await self.server.stop(0)
            raise
        price = common_pb2.Price(**self.config.price.model_dump())
        billing = (
            Billing(
                self.chain,
                price,
                self.config.policy,
                TokenDesk(self.config.data_dir, self.config.price.credits_per_token),
            )
            if self.chain is not None
            else None
        )
        service = InferenceService(self.keys.identity, engines, self.config.policy, billing, self.metrics)
        self.servicer.service = service
        self.verifier.service = VerifierService(
            self.keys.identity,
            lambda: service.engines,
            self.trust.book,
            on_verdict=self._record_verdict,
            judge_method=self.config.judge_method,
        )
        await self._stake()
        await self.server.mark_serving()
        await self.join_swarm()  # after loading: the first descriptor others see lists the models
        if self.chain is not None and self.config.verifier:
            self.appeals = AppealDuties(self.chain, self.verifier.service)
            self.appeals.start()
        log.info("inference node ready", node_id=self.keys.identity.node_id, address=self.address)

    async def _stake(self) -> None:
        """Bonds up to ``stake`` credits of the account (what it holds, if less)."""
        chain = self.chain
        if chain is None:
            return
        account = chain.state.account(self.keys.identity.public_key)
        wanted = min(self.config.stake - account.bonded, account.available)
        if wanted > 0:
            bond = chain_pb2.BondStake(credits=wanted)
            await chain.send(bond=bond)
            log.info("bonding stake", credits=wanted, bonded=account.bonded)

    async def _record_verdict(
        self, signed: verifier_pb2.SignedVerdict, verdict: verifier_pb2.Verdict, evidence: chain_pb2.VerdictEvidence
    ) -> None:
        """Records the verdict on the chain if the chain's lottery drew this node's account to
        verify that receipt (a FAIL with its evidence); otherwise it counts for nothing."""
        chain = self.chain
        if chain is None:
            return
        epoch, drawn = chain.state.check_assignment(verdict_id(evidence.receipt), verdict.provider_key)
        if chain.state.account_of(self.keys.identity.public_key) not in drawn:
            log.info("not drawn to verify this receipt; verdict not recorded", request_id=verdict.subject_id)
            return
        if verdict.outcome != verifier_pb2.VERDICT_OUTCOME_FAIL:
            evidence = chain_pb2.VerdictEvidence(receipt=evidence.receipt)  # a PASS needs only the receipt
        record = chain_pb2.RecordVerdict(verdict=signed, evidence=evidence, lottery_epoch=epoch)
        try:
            await chain.send(verdict=record)
        except ServiceError as error:
            log.warning("verdict not recorded", reason=str(error))

    async def close(self) -> None:
        if self.appeals is not None:
            await self.appeals.close()
        await self.links.close()
        await self.channels.close()
        service = self.servicer.service
        if service is not None:
            for engine in service.engines.values():
                await engine.close()
            if service.billing is not None:
                service.billing.desk.close()
