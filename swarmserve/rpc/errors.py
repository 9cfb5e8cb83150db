"""Domain errors and the one place they become gRPC status codes (and HTTP statuses, for the
router's OpenAI-compatible API).

Servicers raise these (or let native crypto errors and ``ValueError`` propagate);
:class:`~swarmserve.rpc.interceptor.ErrorInterceptor` turns them into status codes.
"""

from __future__ import annotations

import grpc

from swarmserve import native

__all__ = [
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "http_status_for",
    "status_for",
]


class ServiceError(Exception):
    """An error whose message is safe to send to the caller. Subclasses fix the status code;
    ``code`` sets it for errors that carry another node's status (a circuit's, say)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLarge(InvalidArgument):
    """A request larger than this node accepts (HTTP 413)."""


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


# Native errors reach servicers only from bytes a peer sent, so they are the peer's fault.
_NATIVE_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (native.ReplayError, grpc.StatusCode.ALREADY_EXISTS),
    (native.ReplayCacheFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (native.CircuitClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (native.CryptoError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and caller-safe message for ``error``, or None for an unexpected one
    (which the interceptor reports as INTERNAL without details)."""
    if isinstance(error, ServiceError):
        return error.code, str(error)
    for kind, code in _NATIVE_CODES:
        if isinstance(error, kind):
            return code, str(error)
    return None


_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.DATA_LOSS: 502,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_for(error: BaseException) -> tuple[int, str] | None:
    """The HTTP status and caller-safe message for ``error`` (the gRPC mapping, read as HTTP), or
    None for an unexpected one (reported as 500 without details)."""
    if isinstance(error, PayloadTooLarge):
        return 413, str(error)
    found = status_for(error)
    if found is None:
        return None
    code, message = found
    return _HTTP_STATUS.get(code, 500), message
