"""The ``Verifier`` gRPC servicer: protobuf in, calls to :class:`VerifierService`, protobuf out."""

from __future__ import annotations

from typing import Any

from grpc import aio

from services.verifier.service import VerifierService
from swarmserve.rpc import Unavailable, Unimplemented
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
        _, verdict = await self._service().check(
            request.receipt, list(request.prompt_token_ids), list(request.token_ids), list(request.token_texts)
        )
        return verdict

    async def Judge(
        self, request: verifier_pb2.JudgeRequest, context: aio.ServicerContext[Any, Any]
    ) -> verifier_pb2.SignedVerdict:
        raise Unimplemented("duel judging is not built yet (issue #6, in progress)")

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
