"""The verifier's behaviour, independent of gRPC: re-execution checks of served streams on the
node's own (trusted) copies of its models, signed verdicts, and the reputation they feed.
The servicer (``servicer.py``) only converts protobuf to these calls and back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from services.inference.engine import Engine
from services.verifier.checks import METHOD, CheckResult, Outcome, check_stream
from services.verifier.reputation import ProviderStanding, ReputationBook, verdict_score
from services.verifier.verdicts import sign_verdict
from swarmserve import native
from swarmserve.receipts import ReceiptError, verify_receipt
from swarmserve.rpc import InvalidArgument, NotFound
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, verifier_pb2

__all__ = ["VerifierService"]

log = get_logger("swarmserve.verifier")

_OUTCOMES = {
    Outcome.PASS: verifier_pb2.VERDICT_OUTCOME_PASS,
    Outcome.FAIL: verifier_pb2.VERDICT_OUTCOME_FAIL,
    Outcome.INCONCLUSIVE: verifier_pb2.VERDICT_OUTCOME_INCONCLUSIVE,
}

VerdictSink = Callable[[verifier_pb2.SignedVerdict, verifier_pb2.Verdict], Awaitable[None]]
"""Called with each conclusive verdict, signed and as its body."""


class VerifierService:
    def __init__(
        self,
        identity: native.Identity,
        engines: Callable[[], Mapping[str, Engine]],
        reputation: ReputationBook,
        on_verdict: VerdictSink | None = None,
    ) -> None:
        self._identity = identity
        self._engines = engines
        self.reputation = reputation
        self._on_verdict = on_verdict

    def _engine_for(self, digest: bytes) -> Engine:
        for engine in self._engines().values():
            if engine.identity.weights_digest == digest:
                return engine
        raise NotFound(f"this verifier holds no model with weights digest {digest.hex()}")

    async def check(
        self,
        signed: common_pb2.SignedReceipt,
        prompt_ids: Sequence[int],
        token_ids: Sequence[int],
        texts: Sequence[bytes],
    ) -> tuple[CheckResult, verifier_pb2.SignedVerdict]:
        try:
            receipt = verify_receipt(signed, token_ids, texts)
        except ReceiptError as error:
            raise InvalidArgument(f"receipt does not check out: {error}") from None
        engine = self._engine_for(receipt.model_digest)
        result = await check_stream(engine, receipt, prompt_ids, token_ids)
        verdict = verifier_pb2.Verdict(
            kind=verifier_pb2.VERDICT_KIND_CHECK,
            subject_id=receipt.request_id,
            provider_key=receipt.node_key,
            outcome=_OUTCOMES[result.outcome],
            score=result.score,
            method=METHOD,
            reference_model_digest=receipt.model_digest,
        )
        score = verdict_score(verdict)
        if score is not None:
            self.reputation.record(receipt.node_key, score, failed=result.outcome is Outcome.FAIL)
        log.info(
            "checked stream",
            provider=native.node_id(receipt.node_key),
            request_id=receipt.request_id,
            outcome=result.outcome.value,
            tokens=result.positions,
            implausible=result.implausible,
            reason=result.reason,
        )
        signed_verdict = sign_verdict(self._identity, verdict)
        if self._on_verdict is not None and result.outcome is not Outcome.INCONCLUSIVE:
            await self._on_verdict(signed_verdict, verdict)
        return result, signed_verdict

    def standings(self, provider_keys: Sequence[bytes]) -> dict[bytes, ProviderStanding]:
        if provider_keys:
            return {key: self.reputation.standing(key) for key in provider_keys}
        return self.reputation.all()
