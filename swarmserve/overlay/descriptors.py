"""Node descriptors: what a node says about itself (address, roles, keys, models, load),
signed by its identity key. A descriptor is only ever used after :func:`open_descriptor` has
checked that signature against the identity key inside it."""

from __future__ import annotations

import time

from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.v1 import common_pb2

__all__ = ["DescriptorError", "node_id_of", "open_descriptor", "sign_descriptor"]

# Versions, incarnations and issue times start at the clock in milliseconds and grow by one per
# update or refutation. One a day ahead of the clock (or near 2^64) is no honest node's: taking it
# would let a node's own counter be pushed where it can no longer grow.
_AHEAD_MS = 24 * 3600 * 1000


class DescriptorError(Exception):
    """A descriptor that must not be used; the message says why."""


def sign_descriptor(identity: native.Identity, descriptor: common_pb2.NodeDescriptor) -> common_pb2.SignedDescriptor:
    if descriptor.identity_key != identity.public_key:
        raise ValueError("a node signs only its own descriptor")
    body = descriptor.SerializeToString(deterministic=True)
    return common_pb2.SignedDescriptor(descriptor=body, signature=identity.sign(body))


def open_descriptor(signed: common_pb2.SignedDescriptor) -> common_pb2.NodeDescriptor:
    """The descriptor, once its signature checks out under its own identity key."""
    try:
        descriptor = common_pb2.NodeDescriptor.FromString(signed.descriptor)
    except DecodeError as error:
        raise DescriptorError(f"not a NodeDescriptor: {error}") from None
    try:
        native.verify_signature(descriptor.identity_key, signed.descriptor, signed.signature)
    except native.CryptoError as error:
        raise DescriptorError(f"descriptor signature does not verify: {error}") from None
    if len(descriptor.onion_key) not in (0, 32):
        raise DescriptorError("descriptor onion key is not 32 bytes")
    if not descriptor.address:
        raise DescriptorError("descriptor has no address")
    limit = int(time.time() * 1000) + _AHEAD_MS
    for name in ("version", "incarnation", "issued_unix_ms"):
        if getattr(descriptor, name) > limit:
            raise DescriptorError(f"descriptor {name} is more than a day ahead of the clock")
    return descriptor


def node_id_of(descriptor: common_pb2.NodeDescriptor) -> str:
    return native.node_id(descriptor.identity_key)
