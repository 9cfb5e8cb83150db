"""Builds and signs this node's own descriptor, fresh each time (load figures change), with a
version that only ever grows, and the membership incarnation that grows only to refute a claim
that the node is suspect or dead (both start at the clock, so a restarted node outranks its past)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from swarmserve import native
from swarmserve.keys import OnionKeyRing
from swarmserve.overlay.descriptors import sign_descriptor
from swarmserve.overlay.packets import Message, leave_message, sign_claim, sign_message
from swarmserve.v1 import common_pb2, overlay_pb2

__all__ = ["DescriptorPublisher"]

_MAX_COUNTER = 2**64 - 1  # the wire's uint64: checked, never wrapped


class DescriptorPublisher:
    def __init__(
        self,
        identity: native.Identity,
        roles: Sequence[common_pb2.NodeRole.ValueType],
        address: Callable[[], str],
        onion_keys: OnionKeyRing | None = None,
        fill: Callable[[common_pb2.NodeDescriptor], None] | None = None,
    ) -> None:
        self._identity = identity
        self._roles = list(roles)
        self._address = address
        self._onion_keys = onion_keys
        self._fill = fill
        self._version = 0
        self.incarnation = int(time.time() * 1000)

    @property
    def identity_key(self) -> bytes:
        return self._identity.public_key

    @property
    def address(self) -> str:
        """Where this node's gRPC services listen, as its descriptors say."""
        return self._address()

    def refute(self) -> None:
        """Moves past a suspicion or death claimed about the current incarnation (claims about
        any other incarnation are ignored before they get here, so a claim cannot push the
        counter anywhere: it grows by one per refutation)."""
        if self.incarnation >= _MAX_COUNTER:
            raise OverflowError("this node's incarnation cannot grow any more")
        self.incarnation += 1

    def leave_signature(self) -> bytes:
        """This node's goodbye at its current incarnation (see :func:`leave_message`)."""
        return self._identity.sign(leave_message(self._identity.public_key, self.incarnation))

    def sign(self, message: Message) -> Message:
        """Signs a gossip message this node sends (see ``packets.py``)."""
        return sign_message(self._identity, message)

    def claim(
        self, identity_key: bytes, state: overlay_pb2.MemberState.ValueType, incarnation: int
    ) -> overlay_pb2.MemberUpdate:
        """This node's own signed claim that a member is suspect (or dead, by its timer)."""
        return sign_claim(
            self._identity, overlay_pb2.MemberUpdate(identity_key=identity_key, state=state, incarnation=incarnation)
        )

    def describe(self) -> common_pb2.SignedDescriptor:
        now_ms = int(time.time() * 1000)
        if self._version >= _MAX_COUNTER:
            raise OverflowError("this node's descriptor version cannot grow any more")
        self._version = max(self._version + 1, now_ms)
        descriptor = common_pb2.NodeDescriptor(
            identity_key=self._identity.public_key,
            version=self._version,
            address=self._address(),
            roles=self._roles,
            onion_key=self._onion_keys.public_key if self._onion_keys else b"",
            onion_key_expires_unix_ms=self._onion_keys.expires_unix_ms if self._onion_keys else 0,
            issued_unix_ms=now_ms,
            incarnation=self.incarnation,
        )
        if self._fill is not None:
            self._fill(descriptor)
        return sign_descriptor(self._identity, descriptor)
