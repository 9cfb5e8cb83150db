"""gRPC plumbing shared by every service: the server bootstrap, the error interceptor and the
domain errors servicers raise."""

from swarmserve.rpc.channels import STREAM_EOF, ChannelPool, open_stream
from swarmserve.rpc.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    http_status_for,
    status_for,
)
from swarmserve.rpc.interceptor import ErrorInterceptor
from swarmserve.rpc.limits import TokenBuckets
from swarmserve.rpc.server import RpcServer, ServiceBinding

__all__ = [
    "STREAM_EOF",
    "ChannelPool",
    "DataLoss",
    "ErrorInterceptor",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "ResourceExhausted",
    "RpcServer",
    "ServiceBinding",
    "ServiceError",
    "TokenBuckets",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "http_status_for",
    "open_stream",
    "status_for",
]
