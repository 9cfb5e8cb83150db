"""The one interceptor that maps exceptions raised by servicers to gRPC status codes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from grpc import aio

from swarmserve.rpc.errors import InvalidArgument, status_for
from swarmserve.telemetry import get_logger

__all__ = ["ErrorInterceptor"]

log = get_logger("swarmserve.rpc")

MAX_DETAILS = 2048  # characters of an error message sent to the caller


if TYPE_CHECKING:  # generic in grpc-stubs only; not subscriptable at run time
    _ServerInterceptor = aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = aio.ServerInterceptor


class ErrorInterceptor(_ServerInterceptor):
    """Wraps every handler: binds a request id for the logs, turns known errors into their
    status codes, and unexpected ones into INTERNAL with an id to find them in the logs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        deserialize = _decoding(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary), deserialize, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(method, handler.stream_unary), deserialize, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream), deserialize, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(method, handler.stream_stream), deserialize, handler.response_serializer
        )


class _Undecodable:
    """What a request that does not parse becomes, so that the handler refuses it with
    INVALID_ARGUMENT (gRPC would answer a deserializer's exception with UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _decoding(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decoded(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # DecodeError, or anything a hostile encoding provokes
            return _Undecodable(error)

    return decoded


def _refuse_undecodable(request: Any) -> Any:
    """The request, or, for a stream of them, one that refuses an undecodable message."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message: {request.error}")
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _refuse_undecodable(request)


async def _abort(method: str, context: aio.ServicerContext[Any, Any], error: Exception) -> None:
    mapped = status_for(error)
    if mapped is None:
        incident = uuid.uuid4().hex[:12]
        log.error("unhandled error", method=method, incident=incident, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
    else:
        code, message = mapped
        if len(message) > MAX_DETAILS:  # a message may quote the request: keep it under gRPC's trailer limit
            message = message[:MAX_DETAILS] + "..."
        log.info("request refused", method=method, code=code.name, reason=message)
        await context.abort(code, message)


def _wrap_unary(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapped(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        structlog.contextvars.bind_contextvars(rpc=method)
        try:
            return await behaviour(_refuse_undecodable(request), context)
        except aio.AbortError:
            raise
        except Exception as error:
            await _abort(method, context, error)
        finally:
            structlog.contextvars.unbind_contextvars("rpc")

    return wrapped


def _wrap_stream(method: str, behaviour: Callable[..., Any] | None) -> Callable[..., Any]:
    assert behaviour is not None, "a handler has exactly one behaviour"

    async def wrapped(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        structlog.contextvars.bind_contextvars(rpc=method)
        try:
            request = _refuse_undecodable(request)
        except InvalidArgument as error:
            await _abort(method, context, error)
        stream = behaviour(request, context)

        def close_on_cancel(_: Any) -> None:
            # A cancelled call leaves this stream suspended at a yield, and nothing else would
            # close it until the garbage collector runs; closing it now runs the cleanup of
            # every generator below (an engine slot, a circuit) at once.
            if context.cancelled():
                asyncio.get_running_loop().create_task(_close(stream))

        context.add_done_callback(close_on_cancel)  # type: ignore[arg-type]  # grpc-stubs wants a class; any callable works
        try:
            async with contextlib.aclosing(stream):
                async for response in stream:
                    yield response
        except aio.AbortError:
            raise
        except Exception as error:
            await _abort(method, context, error)
        finally:
            structlog.contextvars.unbind_contextvars("rpc")

    return wrapped


async def _close(stream: Any) -> None:
    with contextlib.suppress(RuntimeError, StopAsyncIteration):  # already closing or closed
        await stream.aclose()
