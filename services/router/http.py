"""The router's HTTP port: the OpenAI-compatible API (``openai_api.py``) on Starlette, served by
uvicorn in the router's own loop (``swarmserve.http``).

Starlette rather than FastAPI: the request bodies are validated by our own pydantic models so
that every refusal is OpenAI's error JSON with the right status (FastAPI's automatic 422s would
have to be overridden route by route), and nothing else FastAPI adds (OpenAPI pages, dependency
injection) is used. Errors come from ``swarmserve.rpc.http_status_for``: the one mapping the
gRPC interceptor uses too.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.router.config import RouterConfig
from services.router.dashboard import dashboard_routes
from services.router.openai_api import (
    OWNED_BY,
    Answer,
    ChatCompletionRequest,
    CompletionRequest,
    chunk,
    completion_body,
    error_body,
    parse,
    to_generate_request,
    usage_chunk,
)
from services.router.service import RouterService, TokenDelta
from swarmserve.rpc import InvalidArgument, PayloadTooLarge, Unauthenticated, http_status_for
from swarmserve.telemetry import get_logger
from swarmserve.telemetry.metrics import NodeMetrics, metrics_route
from swarmserve.v1 import common_pb2, router_pb2

__all__ = ["create_app"]

log = get_logger("swarmserve.router.http")

_JSON_OVERHEAD = 4  # a JSON body may be this many times the size of the request it encodes


def create_app(service: RouterService, config: RouterConfig, metrics: NodeMetrics) -> Starlette:
    keys = [key.get_secret_value().encode() for key in config.api_keys]

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), key) for key in keys):
            raise Unauthenticated("a valid API key is required (Authorization: Bearer KEY)")

    async def read_json(request: Request) -> Any:
        limit = config.max_request_bytes * _JSON_OVERHEAD
        if int(request.headers.get("content-length") or 0) > limit:
            raise PayloadTooLarge(f"the body is larger than this router accepts ({limit} bytes)")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise PayloadTooLarge(f"the body is larger than this router accepts ({limit} bytes)")
        try:
            return json.loads(body)
        except ValueError:
            raise InvalidArgument("the body is not valid JSON") from None

    async def models(request: Request) -> Response:
        authorize(request)
        names = sorted(
            {
                model.name
                for peer in service.directory.alive(common_pb2.NODE_ROLE_INFERENCE)
                for model in peer.descriptor.models
            }
        )
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": OWNED_BY} for n in names],
            }
        )

    async def generate(request: Request, kind: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
        authorize(request)
        asked = parse(kind, await read_json(request))
        answer = Answer(asked)
        events = service.generate(to_generate_request(asked))
        try:
            first = await anext(events)  # refusals before any token get their own status
        except BaseException:
            await events.aclose()
            raise
        if not asked.stream:
            async with aclosing(events):
                await _collect(answer, first, events)
            return JSONResponse(completion_body(answer))
        include_usage = bool(asked.stream_options and asked.stream_options.include_usage)
        return StreamingResponse(
            _stream(answer, first, events, include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest)

    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest)

    async def on_error(request: Request, error: Exception) -> Response:
        found = http_status_for(error)
        if found is None:
            log.exception("unexpected error in the HTTP API", path=request.url.path)
            found = (500, "internal error")
        status, message = found
        return JSONResponse(error_body(status, message), status_code=status)

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            metrics_route(metrics),
            *dashboard_routes(service),
        ],
        exception_handlers={Exception: on_error},
    )


Events = AsyncGenerator[TokenDelta | router_pb2.GenerateSummary, None]


async def _collect(answer: Answer, first: TokenDelta | router_pb2.GenerateSummary, events: Events) -> None:
    event = first
    while True:
        if isinstance(event, router_pb2.GenerateSummary):
            answer.summary = event
            return
        answer.add(event)
        event = await anext(events)


async def _stream(
    answer: Answer, first: TokenDelta | router_pb2.GenerateSummary, events: Events, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per token, the final chunk, the usage chunk if asked, [DONE].
    An error after the first chunk is sent as an ``error`` event (the status is already 200).
    A client that goes away cancels this, and closing ``events`` closes the circuit."""
    async with aclosing(events):
        event, opening = first, True
        try:
            while not isinstance(event, router_pb2.GenerateSummary):
                start = len(answer.token_ids)
                answer.add(event)
                tokens = range(start, len(answer.token_ids))
                yield _sse(chunk(answer, event.text, tokens, first=opening))
                opening = False
                event = await anext(events)
        except Exception as error:
            found = http_status_for(error) or (500, "internal error")
            yield _sse(error_body(*found))
            return
        answer.summary = event
        yield _sse(chunk(answer, None, first=opening))
        if include_usage:
            yield _sse(usage_chunk(answer))
        yield b"data: [DONE]\n\n"


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
