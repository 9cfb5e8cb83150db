"""The verifier's behaviour, independent of gRPC: re-execution checks of served streams and
duel votes on the node's own (trusted) copies of its models, and signed verdicts with their
evidence, handed to the node to record on the ledger's chain (reputation follows from the
chain, ``swarmserve/trust``).
The servicer (``servicer.py``) only converts protobuf to these calls and back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from services.inference.engine import ChatTurn, Engine, EngineUnavailable
from services.verifier.checks import METHOD, CheckResult, Outcome, check_stream
from services.verifier.judging import JudgeMethod, judge
from swarmserve import native
from swarmserve.receipts import ReceiptError, prompt_digest, verify_receipt
from swarmserve.rpc import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from swarmserve.telemetry import get_logger
from swarmserve.trust import ProviderStanding, ReputationBook
from swarmserve.v1 import chain_pb2, common_pb2, verifier_pb2
from swarmserve.verdicts import sign_verdict

__all__ = ["DuelSide", "VerifierService"]

log = get_logger("swarmserve.verifier")

_OUTCOMES = {
    Outcome.PASS: verifier_pb2.VERDICT_OUTCOME_PASS,
    Outcome.FAIL: verifier_pb2.VERDICT_OUTCOME_FAIL,
    Outcome.INCONCLUSIVE: verifier_pb2.VERDICT_OUTCOME_INCONCLUSIVE,
}


@dataclass(frozen=True)
class DuelSide:
    """One provider's answer in a duel, with the receipt that commits to it."""

    receipt: common_pb2.SignedReceipt
    token_ids: Sequence[int]
    token_texts: Sequence[bytes]
    prefix_ids: Sequence[int] = ()  # a segment of a resumed stream: the tokens before it


Prompt = str | Sequence[ChatTurn] | Sequence[int]
"""What was asked: text, a chat (templated by the verifier's model), or token ids."""

VerdictSink = Callable[[verifier_pb2.SignedVerdict, verifier_pb2.Verdict, chain_pb2.VerdictEvidence], Awaitable[None]]
"""Called with each conclusive verdict, signed and as its body, and its evidence."""


class VerifierService:
    def __init__(
        self,
        identity: native.Identity,
        engines: Callable[[], Mapping[str, Engine]],
        reputation: Callable[[], ReputationBook] = ReputationBook,
        on_verdict: VerdictSink | None = None,
        judge_method: JudgeMethod = "likelihood",
    ) -> None:
        self._judge_method: JudgeMethod = judge_method
        self._identity = identity
        self._engines = engines
        self._reputation = reputation  # the node's book, from the chain
        self._on_verdict = on_verdict
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (check or duel, outcome) -> verdicts given

    def _engine_for(self, digest: bytes) -> Engine:
        for engine in self._engines().values():
            if engine.identity.weights_digest == digest:
                return engine
        raise NotFound(f"this verifier holds no model with weights digest {digest.hex()}")

    def _prompt_ids(self, engine: Engine, prompt: Prompt) -> tuple[str, list[int]]:
        """The prompt's text (templated) and token ids under ``engine``, as a serving node
        derives them; token ids given are taken as they are."""
        if not isinstance(prompt, str) and all(isinstance(part, int) for part in prompt):
            return "", [part for part in prompt if isinstance(part, int)]
        turns = [part for part in prompt if isinstance(part, ChatTurn)]
        size = len(prompt) if isinstance(prompt, str) else sum(len(turn.content) for turn in turns)
        if not size or size > engine.identity.context_length * 32:  # tokenizing costs: refuse the absurd first
            raise InvalidArgument(f"the prompt must be 1 to {engine.identity.context_length * 32} characters")
        try:
            text = prompt if isinstance(prompt, str) else engine.apply_chat_template(turns)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        return text, engine.tokenize(text)

    async def check(
        self,
        signed: common_pb2.SignedReceipt,
        prompt: Prompt,
        token_ids: Sequence[int],
        texts: Sequence[bytes],
        prefix_ids: Sequence[int] = (),
    ) -> tuple[CheckResult, verifier_pb2.SignedVerdict]:
        try:
            receipt = verify_receipt(signed, token_ids, texts)
        except ReceiptError as error:
            raise InvalidArgument(f"receipt does not check out: {error}") from None
        if receipt.node_key == self._identity.public_key:
            raise PermissionDenied("a verifier does not check its own streams")
        engine = self._engine_for(receipt.model_digest)
        _, prompt_ids = self._prompt_ids(engine, prompt)
        try:
            result = await check_stream(engine, receipt, prompt_ids, token_ids, prefix_ids)
        except EngineUnavailable as error:
            raise FailedPrecondition(f"this verifier cannot replay streams of that model: {error}") from None
        verdict = verifier_pb2.Verdict(
            kind=verifier_pb2.VERDICT_KIND_CHECK,
            subject_id=receipt.request_id,
            provider_key=receipt.node_key,
            outcome=_OUTCOMES[result.outcome],
            score=result.score,
            method=METHOD,
            reference_model_digest=receipt.model_digest,
        )
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
        self.outcomes["check", result.outcome.value] += 1
        if self._on_verdict is not None and result.outcome is not Outcome.INCONCLUSIVE:
            evidence = chain_pb2.VerdictEvidence(
                receipt=signed,
                prompt_token_ids=prompt_ids,
                token_ids=token_ids,
                token_texts=texts,
                prefix_token_ids=prefix_ids,
            )
            await self._on_verdict(signed_verdict, verdict, evidence)
        return result, signed_verdict

    async def replay(self, evidence: chain_pb2.VerdictEvidence) -> CheckResult:
        """Re-executes a recorded FAIL's evidence (as an appeal juror), recording nothing."""
        try:
            receipt = verify_receipt(evidence.receipt, evidence.token_ids, evidence.token_texts)
        except ReceiptError as error:
            raise InvalidArgument(f"receipt does not check out: {error}") from None
        if prompt_digest(evidence.prompt_token_ids) != receipt.prompt_digest:
            raise InvalidArgument("the prompt is not the one the receipt commits to")
        engine = self._engine_for(receipt.model_digest)
        try:
            return await check_stream(
                engine,
                receipt,
                list(evidence.prompt_token_ids),
                list(evidence.token_ids),
                list(evidence.prefix_token_ids),
            )
        except EngineUnavailable as error:
            raise FailedPrecondition(f"this verifier cannot replay streams of that model: {error}") from None

    async def judge(
        self,
        duel_id: str,
        prompt: str | Sequence[ChatTurn],
        first: DuelSide,
        second: DuelSide,
    ) -> verifier_pb2.SignedVerdict:
        """This judge's signed vote on a duel (see ``judging.py`` for the method). The vote names
        the side it prefers as ``provider_key`` (outcome PASS), or is INCONCLUSIVE on a tie."""
        if not duel_id or len(duel_id) > 64:
            raise InvalidArgument("duel_id must be 1 to 64 characters")
        receipts = []
        for name, side in (("first", first), ("second", second)):
            try:
                receipts.append(verify_receipt(side.receipt, side.token_ids, side.token_texts))
            except ReceiptError as error:
                raise InvalidArgument(f"the {name} answer's receipt does not check out: {error}") from None
        parties = {r.node_key for r in receipts}
        if self._identity.public_key in parties:
            raise PermissionDenied("a judge cannot judge a duel it is a party to")
        if len(parties) != 2:
            raise InvalidArgument("both answers are by one provider")
        if receipts[0].model_digest != receipts[1].model_digest:
            raise InvalidArgument("the answers claim different models")
        if receipts[0].prompt_digest != receipts[1].prompt_digest:
            raise InvalidArgument("the answers are to different prompts")
        engine = self._engine_for(receipts[0].model_digest)
        prompt_text, prompt_ids = self._prompt_ids(engine, prompt)
        if prompt_digest(prompt_ids) != receipts[0].prompt_digest:
            raise InvalidArgument("the prompt given is not the one the answers' receipts commit to")
        longest = max(len(first.token_ids), len(second.token_ids))
        if len(prompt_ids) + longest > engine.identity.context_length:
            raise InvalidArgument(f"prompt and answer exceed the model's context of {engine.identity.context_length}")
        if any(token >= engine.vocab_size for token in (*first.token_ids, *second.token_ids)):
            raise InvalidArgument(f"a token id is outside the model's vocabulary of {engine.vocab_size}")
        judgement = await judge(
            engine,
            self._judge_method,
            prompt_text,
            prompt_ids,
            (receipts[0], receipts[1]),
            (first.token_ids, second.token_ids),
        )
        keys = [r.node_key for r in receipts]
        preferred = judgement.preferred
        decided = verifier_pb2.VERDICT_OUTCOME_INCONCLUSIVE if preferred is None else verifier_pb2.VERDICT_OUTCOME_PASS
        winner, loser = (keys[0], keys[1]) if preferred in (0, None) else (keys[1], keys[0])
        vote = verifier_pb2.Verdict(
            kind=verifier_pb2.VERDICT_KIND_DUEL,
            subject_id=duel_id,
            provider_key=winner,
            opponent_key=loser,
            outcome=decided,
            score=judgement.score,
            method=judgement.method,
            reference_model_digest=engine.identity.weights_digest,
        )
        self.outcomes["duel", "undecided" if preferred is None else "decided"] += 1
        log.info(
            "judged duel",
            duel_id=duel_id,
            winner=None if preferred is None else native.node_id(winner),
            margin=round(judgement.margin, 4),
            method=judgement.method.split(":")[0],
            replays=None if judgement.replays is None else [r.reason for r in judgement.replays],
        )
        return sign_verdict(self._identity, vote)

    def standings(self, provider_keys: Sequence[bytes]) -> dict[bytes, ProviderStanding]:
        book = self._reputation()
        if provider_keys:
            return {key: book.standing(key) for key in provider_keys}
        return book.all()
