"""Duel-and-judge (WWW.Serve), run by routers on a sample of the requests they serve.

The request is served as usual; afterwards, in the background, the router sends the same
request through another onion circuit to a second provider of the model, then asks
``duels.judges`` judges to vote. Judges are verifier nodes holding the model that are neither
party and are trusted, drawn without replacement with probability proportional to their stake
plus one. Each judge gets the two answers in an order drawn for it, so a judge that always votes
for one position is caught disagreeing with the majority (and so is one that always votes for
one provider). The winner is the side more judges voted for; undecided votes count for neither.
A decided duel is recorded in the router's ledger chain as a signed duel result carrying every
vote (replicas recheck it with ``swarmserve.verdicts.tally_duel``), and burns ``slash_share`` of
the loser's stake. Reputation follows from the record (``services/verifier/reputation.py``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grpc import aio

from services.router.config import DuelSettings
from services.verifier.service import DuelSide
from swarmserve import native
from swarmserve.ledger import LedgerRejection
from swarmserve.overlay import Peer
from swarmserve.rpc import ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, ledger_pb2, router_pb2, verifier_pb2, verifier_pb2_grpc
from swarmserve.verdicts import VerdictError, decide_duel, open_verdict, sign_verdict

if TYPE_CHECKING:
    from services.router.service import RouterService, TokenDelta

__all__ = ["DUEL_METHOD", "DuelOrganiser", "DuelOutcome"]

log = get_logger("swarmserve.router")

DUEL_METHOD = "duel-majority-v1: judges drawn without replacement with weight stake+1; winner by more votes"


@dataclass(frozen=True)
class DuelOutcome:
    duel_id: str
    result: verifier_pb2.SignedVerdict | None  # None: undecided (a tie, or no judge answered)
    votes: list[verifier_pb2.Verdict]


class DuelOrganiser:
    def __init__(self, router: RouterService, settings: DuelSettings) -> None:
        self._router = router
        self._settings = settings
        self._random = random.SystemRandom()
        self._running: set[asyncio.Task[DuelOutcome | None]] = set()

    def maybe_start(self, request: router_pb2.GenerateRequest, first: DuelSide) -> None:
        """Starts a duel over this served request with probability ``duels.rate``."""
        if self._random.random() < self._settings.rate:
            task = asyncio.create_task(self._guarded(request, first))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _guarded(self, request: router_pb2.GenerateRequest, first: DuelSide) -> DuelOutcome | None:
        try:
            return await asyncio.wait_for(self.run(request, first), self._settings.timeout_s)
        except (ServiceError, TimeoutError, LedgerRejection, VerdictError) as error:
            log.warning("duel abandoned", reason=str(error) or type(error).__name__)
            return None

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def run(self, request: router_pb2.GenerateRequest, first: DuelSide) -> DuelOutcome:
        """Gets a second provider's answer, collects the votes, records a decided result."""
        duel_id = uuid.uuid4().hex
        again = router_pb2.GenerateRequest()
        again.CopyFrom(request)
        again.request_id = f"{duel_id}-b"
        first_key = _body(first).node_key
        second = await self._collect(self._router.generate(again, excluded={native.node_id(first_key)}, duel=False))
        second_key = _body(second).node_key
        if second_key == first_key:  # an offload can land on the first provider again
            return DuelOutcome(duel_id, None, [])
        judges = self._judges(first, {first_key, second_key})
        signed_votes = await asyncio.gather(*(self._vote(judge, duel_id, request, first, second) for judge in judges))
        votes = [(s, v) for s, v in (x for x in signed_votes if x is not None)]
        return DuelOutcome(duel_id, await self._record(duel_id, first, votes), [v for _, v in votes])

    @staticmethod
    async def _collect(stream: AsyncGenerator[TokenDelta | router_pb2.GenerateSummary, None]) -> DuelSide:
        ids: list[int] = []
        texts: list[bytes] = []
        async for event in stream:
            if isinstance(event, router_pb2.GenerateSummary):
                return DuelSide(event.receipt, ids, texts)
            if event.token_id is not None:
                ids.append(event.token_id)
                texts.append(event.token_bytes)
        raise ServiceError("the second provider's stream ended without a summary")

    def _judges(self, answer: DuelSide, parties: set[bytes]) -> list[Peer]:
        digest = _body(answer).model_digest  # the router checked the receipt as it relayed it
        book = self._router.reputation.book()
        ledger = self._router.ledger
        pool = [
            peer
            for peer in self._router.directory.alive(common_pb2.NODE_ROLE_VERIFIER)
            if peer.descriptor.identity_key not in parties
            and any(m.weights_digest == digest for m in peer.descriptor.models)
            and book.standing(peer.descriptor.identity_key).trusted
        ]
        chosen: list[Peer] = []
        while pool and len(chosen) < self._settings.judges:
            weights = [ledger.balance(p.descriptor.identity_key).staked + 1 for p in pool]
            pick = self._random.choices(range(len(pool)), weights)[0]
            chosen.append(pool.pop(pick))
        return chosen

    async def _vote(
        self,
        judge: Peer,
        duel_id: str,
        request: router_pb2.GenerateRequest,
        first: DuelSide,
        second: DuelSide,
    ) -> tuple[verifier_pb2.SignedVerdict, verifier_pb2.Verdict] | None:
        shown = (first, second) if self._random.random() < 0.5 else (second, first)
        ask = verifier_pb2.JudgeRequest(duel_id=duel_id, first=_message(shown[0]), second=_message(shown[1]))
        if request.WhichOneof("input") == "prompt":
            ask.prompt = request.prompt
        else:
            ask.chat.CopyFrom(request.chat)
        stub = verifier_pb2_grpc.VerifierStub(self._router.channels.get(judge.descriptor.address))
        try:
            signed = await stub.Judge(ask, timeout=self._settings.timeout_s)
            vote = open_verdict(signed)
            if signed.verifier_key != judge.descriptor.identity_key:
                raise VerdictError("the vote is signed by another key than the judge's")
            if vote.kind != verifier_pb2.VERDICT_KIND_DUEL or vote.subject_id != duel_id:
                raise VerdictError("the vote is not about this duel")
            if {vote.provider_key, vote.opponent_key} != {_body(first).node_key, _body(second).node_key}:
                raise VerdictError("the vote is about other providers")
        except (aio.AioRpcError, VerdictError) as error:
            reason = error.details() if isinstance(error, aio.AioRpcError) else str(error)
            log.warning("judge gave no vote", judge=judge.node_id[:16], duel_id=duel_id, reason=reason)
            return None
        return signed, vote

    async def _record(
        self,
        duel_id: str,
        first: DuelSide,
        votes: list[tuple[verifier_pb2.SignedVerdict, verifier_pb2.Verdict]],
    ) -> verifier_pb2.SignedVerdict | None:
        result = decide_duel(duel_id, [signed for signed, _ in votes])
        if result is None:
            log.info("duel undecided", duel_id=duel_id, votes=len(votes))
            return None
        result.method = DUEL_METHOD
        result.reference_model_digest = _body(first).model_digest
        signed_result = sign_verdict(self._router.identity, result)
        permille = round(self._settings.slash_share * 1000)
        record = ledger_pb2.VerdictRecord(verdict=signed_result, slash_permille=permille)
        await asyncio.to_thread(self._router.ledger.append, self._router.identity, verdict=record)
        log.info(
            "duel decided",
            duel_id=duel_id,
            winner=native.node_id(result.provider_key)[:16],
            loser=native.node_id(result.opponent_key)[:16],
            share=round(result.score, 2),
            votes=len(votes),
            slash_permille=permille,
        )
        return signed_result


def _body(answer: DuelSide) -> common_pb2.Receipt:
    return common_pb2.Receipt.FromString(answer.receipt.receipt)


def _message(answer: DuelSide) -> verifier_pb2.DuelAnswer:
    return verifier_pb2.DuelAnswer(receipt=answer.receipt, token_ids=answer.token_ids, token_texts=answer.token_texts)
