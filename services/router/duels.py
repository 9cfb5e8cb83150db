"""Duel-and-judge (WWW.Serve), run by routers on a sample of the requests they serve, in a swarm
with a ledger.

The request is served as usual; afterwards, in the background, the router sends the same
request through another onion circuit to a second provider of the model, then asks the judges
to vote. The judges are not the router's choice: the ledger's lottery draws the accounts for the
router's next duel by stake (``swarmserve/chain/lottery.py``), and the router asks their trusted
verifier nodes that hold the model. Each judge gets the two answers in an order drawn for it, so
a judge that always votes for one position is caught disagreeing with the majority (and so is
one that always votes for one provider). The winner is the side more judges voted for;
undecided votes count for neither. A decided duel goes on the chain as a signed result carrying
every vote; the chain rechecks the votes and the draw, and burns part of the loser's stake.
Reputation follows from the chain (``swarmserve/trust``). One duel at a time per router: the
draw of the next one depends on this one being recorded.
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
from services.router.verifiers import drawn_verifiers
from services.verifier.service import DuelSide
from swarmserve import native
from swarmserve.chain import ChainReplica
from swarmserve.overlay import Peer
from swarmserve.rpc import ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.v1 import chain_pb2, common_pb2, router_pb2, verifier_pb2, verifier_pb2_grpc
from swarmserve.verdicts import VerdictError, decide_duel, open_verdict, sign_verdict

if TYPE_CHECKING:
    from services.router.service import RouterService, TokenDelta

__all__ = ["DUEL_METHOD", "DuelOrganiser", "DuelOutcome", "duel_copy"]

log = get_logger("swarmserve.router")

DUEL_METHOD = "duel-majority-v2: judges drawn by the ledger's lottery by stake; winner by more votes"
_RECORDED_WITHIN_S = 30.0


@dataclass(frozen=True)
class DuelOutcome:
    duel_id: str
    result: verifier_pb2.SignedVerdict | None  # None: undecided (a tie, or no judge answered)
    votes: list[verifier_pb2.Verdict]


def duel_copy(request: router_pb2.GenerateRequest, duel_id: str) -> router_pb2.GenerateRequest:
    """The duel's second request: the user's own, named ``duel_id`` at this router only (the
    provider gets a fresh random id, as for any request: ``service.forward_request``)."""
    again = router_pb2.GenerateRequest()
    again.CopyFrom(request)
    again.request_id = duel_id
    return again


class DuelOrganiser:
    def __init__(self, router: RouterService, settings: DuelSettings) -> None:
        self._router = router
        self._settings = settings
        self._random = random.SystemRandom()
        self._running: set[asyncio.Task[DuelOutcome | None]] = set()
        self._one_at_a_time = asyncio.Lock()

    def maybe_start(self, request: router_pb2.GenerateRequest, first: DuelSide) -> None:
        """Starts a duel over this served request with probability ``duels.rate`` (with a ledger)."""
        if self._router.chain is not None and self._random.random() < self._settings.rate:
            task = asyncio.create_task(self._guarded(request, first))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _guarded(self, request: router_pb2.GenerateRequest, first: DuelSide) -> DuelOutcome | None:
        try:
            async with self._one_at_a_time:
                return await asyncio.wait_for(self.run(request, first), self._settings.timeout_s)
        except (ServiceError, TimeoutError, VerdictError) as error:
            log.warning("duel abandoned", reason=str(error) or type(error).__name__)
            return None

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def run(self, request: router_pb2.GenerateRequest, first: DuelSide) -> DuelOutcome:
        """Gets a second provider's answer, collects the votes, records a decided result."""
        duel_id = uuid.uuid4().hex
        again = duel_copy(request, duel_id)
        first_key = _body(first).node_key
        second = await self._collect(
            self._router.generate(again, excluded={native.node_id(first_key)}, may_check=False)
        )
        second_key = _body(second).node_key
        if second_key == first_key:  # an offload can land on the first provider again
            return DuelOutcome(duel_id, None, [])
        chain = self._router.chain
        assert chain is not None  # duels run only with a ledger
        epoch, judges = self._judges(chain, first, {first_key, second_key})
        signed_votes = await asyncio.gather(*(self._vote(judge, duel_id, request, first, second) for judge in judges))
        votes = [(s, v) for s, v in (x for x in signed_votes if x is not None)]
        return DuelOutcome(duel_id, await self._record(chain, epoch, duel_id, first, votes), [v for _, v in votes])

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

    def _judges(self, chain: ChainReplica, answer: DuelSide, parties: set[bytes]) -> tuple[int, list[Peer]]:
        """The lottery epoch and the judges: verifier nodes of the accounts the chain draws for
        this router's next duel."""
        state, me = chain.state, self._router.identity.public_key
        epoch = state.epoch_of(state.height)
        subject = b"duel" + me + state.duels_organised(me).to_bytes(8, "big")
        excluded = {state.account_of(key) for key in (*parties, me)}
        drawn = state.lottery(epoch, subject, state.genesis.parameters.judges_per_duel, excluded)
        digest = _body(answer).model_digest  # the router checked the receipt as it relayed it
        return epoch, drawn_verifiers(state, self._router.directory, self._router.trust.book(), drawn, digest, parties)

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
        chain: ChainReplica,
        epoch: int,
        duel_id: str,
        first: DuelSide,
        votes: list[tuple[verifier_pb2.SignedVerdict, verifier_pb2.Verdict]],
    ) -> verifier_pb2.SignedVerdict | None:
        """Puts a decided duel on the chain and waits until it is applied (the next duel's draw
        depends on it); None if undecided."""
        result = decide_duel(duel_id, [signed for signed, _ in votes])
        if result is None:
            log.info("duel undecided", duel_id=duel_id, votes=len(votes))
            return None
        result.method = DUEL_METHOD
        result.reference_model_digest = _body(first).model_digest
        signed_result = sign_verdict(self._router.identity, result)
        me = self._router.identity.public_key
        organised = chain.state.duels_organised(me)
        record = chain_pb2.RecordDuel(result=signed_result, lottery_epoch=epoch)
        await chain.send(duel=record)
        deadline = asyncio.get_running_loop().time() + _RECORDED_WITHIN_S
        while chain.state.duels_organised(me) == organised:
            if asyncio.get_running_loop().time() > deadline:
                raise ServiceError("the duel result was not recorded on the chain in time")
            await asyncio.sleep(0.1)
        log.info(
            "duel decided",
            duel_id=duel_id,
            winner=native.node_id(result.provider_key)[:16],
            loser=native.node_id(result.opponent_key)[:16],
            share=round(result.score, 2),
            votes=len(votes),
        )
        return signed_result


def _body(answer: DuelSide) -> common_pb2.Receipt:
    return common_pb2.Receipt.FromString(answer.receipt.receipt)


def _message(answer: DuelSide) -> verifier_pb2.DuelAnswer:
    return verifier_pb2.DuelAnswer(receipt=answer.receipt, token_ids=answer.token_ids, token_texts=answer.token_texts)
