"""Caller authentication, for the two cases where a provider must know who sends a request: a
router of the provider's own account (served free) and a provider under ``accept_callers:
min_balance`` (whose balance on the ledger's chain to check). Otherwise routers send no caller
at all and pay in tokens that name nobody. The signature covers the request without its
forwarding state (which changes when a busy node offloads it), its payment tokens, and itself.
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
    core.ClearField("tokens")
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
