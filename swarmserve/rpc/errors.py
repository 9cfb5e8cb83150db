"""Domain errors and the one place they become gRPC status codes.

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
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
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
