"""Audits: re-execution checks of users' own requests, for the users who consent
(``PrivacyOptions.allow_audit``), run by routers in a swarm with a ledger.

Why users' requests and not the verifier's own prompts (PlanetServe's challenges, which verifier
nodes sent through routers until issue 14): a provider that can tell checks from users serves the
claimed model to checks and something cheaper to everyone else, and whatever a verifier writes
itself has a shape of its own (the template challenges scored AUC 0.997 against a detector built
from the public source: ``tests/adversarial/test_checks.py``). A request is a check only if the
decision to check it is taken after it was served and never reaches the provider; then it is
indistinguishable by construction. Two checks work that way: duels (``duels.py``: the user's
own request, copied to a second provider, both answers re-executed by judges) and audits.

An audit shows the user's prompt to one more party, a verifier, and if the provider fails, to
everyone, as the evidence on the ledger. So only with the user's consent. The verifier is drawn
by the ledger's lottery for that receipt (``ChainState.check_assignment``: the verdict only
counts from an account drawn for it), one trusted live verifier node of a drawn account; it
re-executes the stream (``services/verifier/checks.py``) and records the verdict itself, with
the evidence if it fails; the provider may appeal, and a committee re-executes again.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from grpc import aio

from services.router.config import AuditSettings
from services.router.verifiers import drawn_verifiers
from services.verifier.service import DuelSide
from swarmserve.chain.evidence import verdict_id
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, router_pb2, verifier_pb2, verifier_pb2_grpc
from swarmserve.verdicts import VerdictError, open_verdict

if TYPE_CHECKING:
    from services.router.service import RouterService

__all__ = ["Auditor"]

log = get_logger("swarmserve.router")


class Auditor:
    def __init__(self, router: RouterService, settings: AuditSettings) -> None:
        self._router = router
        self._settings = settings
        self._random = random.SystemRandom()
        self._running: set[asyncio.Task[verifier_pb2.Verdict | None]] = set()

    def maybe_start(self, request: router_pb2.GenerateRequest, answer: DuelSide) -> None:
        """Audits this served request with probability ``audits.rate`` if its client consented
        (with a ledger)."""
        if (
            self._router.chain is not None
            and request.privacy.allow_audit
            and self._random.random() < self._settings.rate
        ):
            task = asyncio.create_task(self.run(request, answer))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def run(self, request: router_pb2.GenerateRequest, answer: DuelSide) -> verifier_pb2.Verdict | None:
        """Asks a drawn verifier to re-execute the answer; its verdict (None if no verifier
        answered). The verifier records it on the chain."""
        chain = self._router.chain
        assert chain is not None  # audits run only with a ledger
        receipt = common_pb2.Receipt.FromString(answer.receipt.receipt)
        _, drawn = chain.state.check_assignment(verdict_id(answer.receipt), receipt.node_key)
        verifiers = drawn_verifiers(
            chain.state,
            self._router.directory,
            self._router.trust.book(),
            drawn,
            receipt.model_digest,
            {receipt.node_key},
        )
        if not verifiers:
            log.info("audit skipped: no drawn verifier holds the model", request_id=receipt.request_id)
            return None
        verifier = self._random.choice(verifiers)
        ask = verifier_pb2.CheckReceiptRequest(
            receipt=answer.receipt,
            token_ids=answer.token_ids,
            token_texts=answer.token_texts,
            prefix_token_ids=answer.prefix_ids,
        )
        if request.WhichOneof("input") == "prompt":
            ask.prompt = request.prompt
        else:
            ask.chat.CopyFrom(request.chat)
        stub = verifier_pb2_grpc.VerifierStub(self._router.channels.get(verifier.descriptor.address))
        try:
            signed = await stub.CheckReceipt(ask, timeout=self._settings.timeout_s)
            verdict = open_verdict(signed)
            if signed.verifier_key != verifier.descriptor.identity_key:
                raise VerdictError("the verdict is signed by another key than the verifier's")
            if verdict.kind != verifier_pb2.VERDICT_KIND_CHECK or verdict.provider_key != receipt.node_key:
                raise VerdictError("the verdict is not about this answer")
        except (aio.AioRpcError, VerdictError) as error:
            reason = error.details() if isinstance(error, aio.AioRpcError) else str(error)
            log.warning("audit failed to complete", verifier=verifier.node_id[:16], reason=reason)
            return None
        log.info(
            "audited",
            verifier=verifier.node_id[:16],
            provider=receipt.node_key.hex()[:16],
            outcome=verifier_pb2.VerdictOutcome.Name(verdict.outcome),
        )
        return verdict
