"""The ``Verifier`` gRPC servicer: protobuf in, calls to :class:`VerifierService`, protobuf out."""

from __future__ import annotations

from typing import Any

from grpc import aio

from services.inference.engine import ChatTurn
from services.inference.servicer import to_chat_turns
from services.verifier.service import DuelSide, VerifierService
from swarmserve.rpc import InvalidArgument, Unavailable
from swarmserve.v1 import verifier_pb2, verifier_pb2_grpc

__all__ = ["VerifierServicer"]


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self) -> None:
        self.service: VerifierService | None = None  # set once the models are loaded

    def _service(self) -> VerifierService:
        if self.service is None:
            raise Unavailable("the verifier is still loading its models")
        return self.service

    async def CheckReceipt(
        self, request: verifier_pb2.CheckReceiptRequest, context: aio.ServicerContext[Any, Any]
    ) -> verifier_pb2.SignedVerdict:
        prompt = list(request.prompt_token_ids) or _prompt(request)
        _, verdict = await self._service().check(
            request.receipt,
            prompt,
            list(request.token_ids),
            list(request.token_texts),
            list(request.prefix_token_ids),
        )
        return verdict

    async def Judge(
        self, request: verifier_pb2.JudgeRequest, context: aio.ServicerContext[Any, Any]
    ) -> verifier_pb2.SignedVerdict:
        return await self._service().judge(
            request.duel_id, _prompt(request), _side(request.first), _side(request.second)
        )

    async def GetReputation(
        self, request: verifier_pb2.GetReputationRequest, context: aio.ServicerContext[Any, Any]
    ) -> verifier_pb2.GetReputationResponse:
        standings = self._service().standings(list(request.provider_keys))
        return verifier_pb2.GetReputationResponse(
            providers=[
                verifier_pb2.ProviderReputation(
                    provider_key=key,
                    score=standing.score,
                    verdicts=standing.verdicts,
                    failures=standing.failures,
                    trusted=standing.trusted,
                )
                for key, standing in standings.items()
            ]
        )


def _prompt(request: verifier_pb2.CheckReceiptRequest | verifier_pb2.JudgeRequest) -> str | tuple[ChatTurn, ...]:
    input_kind = request.WhichOneof("input")
    if input_kind is None:
        raise InvalidArgument("the prompt is required (token ids, text or chat)")
    return request.prompt if input_kind == "prompt" else to_chat_turns(request.chat)


def _side(answer: verifier_pb2.DuelAnswer) -> DuelSide:
    return DuelSide(answer.receipt, list(answer.token_ids), list(answer.token_texts))
