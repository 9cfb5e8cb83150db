"""The ``Inference`` gRPC servicer: protobuf in, domain objects to :class:`InferenceService`,
protobuf out. No behaviour lives here; errors are mapped by the shared interceptor."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from grpc import aio

from services.inference.admission import LoadSnapshot
from services.inference.config import ProviderPolicy
from services.inference.engine import ChatTurn, ModelIdentity
from services.inference.service import (
    GenerateRequest,
    GenerationSummary,
    InferenceService,
    SamplingRequest,
    TokenEvent,
)
from swarmserve.chain.callers import authenticated_caller
from swarmserve.rpc import FailedPrecondition, Unavailable
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

__all__ = ["InferenceServicer", "capacity", "load_report", "model_info", "policy_summary", "to_chat_turns"]

_ROLES = {
    common_pb2.CHAT_ROLE_SYSTEM: "system",
    common_pb2.CHAT_ROLE_USER: "user",
    common_pb2.CHAT_ROLE_ASSISTANT: "assistant",
}
_FINISH = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "end_of_sequence": common_pb2.FINISH_REASON_END_OF_SEQUENCE,
}


def model_info(identity: ModelIdentity) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name=identity.name,
        weights_digest=identity.weights_digest,
        quantization=identity.quantization,
        context_length=identity.context_length,
        engine=identity.engine,
    )


def load_report(load: LoadSnapshot) -> common_pb2.LoadReport:
    return common_pb2.LoadReport(
        running=load.running,
        queued=load.queued,
        queued_tokens=load.queued_tokens,
        recent_latency_us=int(load.recent_latency_s * 1e6),
        tokens_per_second=load.tokens_per_second,
        mean_queue_wait_us=int(load.mean_queue_wait_s * 1e6),
        p99_queue_wait_us=int(load.p99_queue_wait_s * 1e6),
    )


def capacity(policy: ProviderPolicy) -> common_pb2.Capacity:
    return common_pb2.Capacity(max_concurrent=policy.max_concurrent, max_queue=policy.max_queue)


def policy_summary(policy: ProviderPolicy, requires_caller: bool) -> common_pb2.PolicySummary:
    return common_pb2.PolicySummary(
        requires_caller=requires_caller,
        default_new_tokens=policy.default_new_tokens,
        max_prompt_tokens=policy.max_prompt_tokens,
        max_new_tokens=policy.max_new_tokens,
        serving_now=policy.serving_at(dt.datetime.now(dt.UTC)),
        min_caller_balance=policy.min_caller_balance,
    )


def to_chat_turns(chat: common_pb2.ChatMessages) -> tuple[ChatTurn, ...]:
    return tuple(ChatTurn(_ROLES.get(m.role, f"unspecified({m.role})"), m.content) for m in chat.messages)


def to_generate_request(message: inference_pb2.InferenceGenerateRequest) -> GenerateRequest:
    sampling = message.sampling
    input_kind = message.WhichOneof("input")
    return GenerateRequest(
        model=message.model,
        prompt=message.prompt if input_kind == "prompt" else None,
        chat=to_chat_turns(message.chat) if input_kind == "chat" else None,
        prompt_ids=tuple(message.prompt_tokens.token_ids) if input_kind == "prompt_tokens" else None,
        sampling=SamplingRequest(
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=tuple(sampling.stop),
        ),
        request_id=message.request_id,
        caller_key=authenticated_caller(message),
        tokens=tuple((t.nonce, t.output) for t in message.tokens),
        resume=tuple(message.resume_token_ids),
    )


def to_response(event: TokenEvent | GenerationSummary) -> inference_pb2.InferenceGenerateResponse:
    if isinstance(event, TokenEvent):
        token = event.token
        return inference_pb2.InferenceGenerateResponse(
            token=inference_pb2.InferenceToken(
                token_id=token.token_id,
                text=token.text,
                index=event.index,
                logprob=token.logprob,
                checkpoint=event.checkpoint,
                receipt_header=event.receipt_header,
            )
        )
    return inference_pb2.InferenceGenerateResponse(
        summary=inference_pb2.InferenceSummary(finish_reason=_FINISH[event.finish_reason.value], receipt=event.receipt)
    )


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, service: InferenceService | None = None) -> None:
        self.service = service  # None while the models load

    def _ready(self) -> InferenceService:
        if self.service is None:
            raise Unavailable("the node is still loading its models")
        return self.service

    async def Generate(
        self,
        request: inference_pb2.InferenceGenerateRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.InferenceGenerateResponse]:
        async with aclosing(self._ready().generate(to_generate_request(request))) as events:
            async for event in events:
                yield to_response(event)

    async def Score(
        self, request: inference_pb2.ScoreRequest, context: aio.ServicerContext[Any, Any]
    ) -> inference_pb2.ScoreResponse:
        engine, positions = await self._ready().score(
            request.model,
            request.expected_weights_digest,
            list(request.prompt_token_ids),
            list(request.completion_token_ids),
            request.top_alternatives,
        )
        return inference_pb2.ScoreResponse(
            model=model_info(engine.identity),
            positions=[
                inference_pb2.PositionScore(
                    logprob=p.logprob,
                    is_top_choice=p.is_top_choice,
                    top=inference_pb2.TokenLogprob(token_id=p.top_token_id, logprob=p.top_logprob),
                    alternatives=[inference_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in p.alternatives],
                )
                for p in positions
            ],
        )

    async def Status(
        self, request: inference_pb2.StatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> inference_pb2.StatusResponse:
        service = self._ready()
        return inference_pb2.StatusResponse(
            identity_key=service.identity.public_key,
            models=[model_info(engine.identity) for engine in service.engines.values()],
            load=load_report(service.load()),
            capacity=capacity(service.policy),
            policy=policy_summary(service.policy, service.requires_caller),
        )

    async def BuyTokens(
        self, request: inference_pb2.BuyTokensRequest, context: aio.ServicerContext[Any, Any]
    ) -> inference_pb2.BuyTokensResponse:
        billing = self._ready().billing
        if billing is None:
            raise FailedPrecondition("this node follows no ledger and sells no tokens")
        evaluated, proof = await asyncio.to_thread(billing.sell, request.cheque, list(request.blinded))
        return inference_pb2.BuyTokensResponse(evaluated=evaluated, proof=proof)
