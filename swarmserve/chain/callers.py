"""Caller authentication: the node that pays for a request (the router) names its identity key
and signs the request, so that a provider knows whose cheques must cover it and, under
``accept_callers: min_balance``, whose balance on the ledger's chain to check. The signature
covers the request without its forwarding state (which changes when a busy node offloads it)
and without the signature itself.
"""

from __future__ import annotations

from swarmserve import native
from swarmserve.v1 import inference_pb2

__all__ = ["authenticated_caller", "sign_as_caller"]

_CONTEXT = b"swarmserve caller v1\x00"


def _signed_bytes(request: inference_pb2.InferenceGenerateRequest) -> bytes:
    core = inference_pb2.InferenceGenerateRequest()
    core.CopyFrom(request)
    core.ClearField("forwarding")
    core.ClearField("caller_signature")
    return _CONTEXT + core.SerializeToString(deterministic=True)


def sign_as_caller(identity: native.Identity, request: inference_pb2.InferenceGenerateRequest) -> None:
    """Names ``identity`` as the request's paying caller and signs the request."""
    request.caller_key = identity.public_key
    request.caller_signature = identity.sign(_signed_bytes(request))


def authenticated_caller(request: inference_pb2.InferenceGenerateRequest) -> bytes:
    """The caller's key if its signature over the request checks out, else empty bytes."""
    if len(request.caller_key) != 32:
        return b""
    try:
        native.verify_signature(request.caller_key, _signed_bytes(request), request.caller_signature)
    except native.CryptoError:
        return b""
    return request.caller_key
