"""Builds and signs this node's own descriptor, fresh each time (load figures change), with a
version that only ever grows, and the membership incarnation that grows only to refute a claim
that the node is suspect or dead (both start at the clock, so a restarted node outranks its past)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from swarmserve import native
from swarmserve.overlay.descriptors import sign_descriptor
from swarmserve.v1 import common_pb2

__all__ = ["DescriptorPublisher"]


class DescriptorPublisher:
    def __init__(
        self,
        identity: native.Identity,
        roles: Sequence[common_pb2.NodeRole.ValueType],
        address: Callable[[], str],
        onion_key: native.OnionKey | None = None,
        fill: Callable[[common_pb2.NodeDescriptor], None] | None = None,
    ) -> None:
        self._identity = identity
        self._roles = list(roles)
        self._address = address
        self._onion_key = onion_key
        self._fill = fill
        self._version = 0
        self.incarnation = int(time.time() * 1000)

    @property
    def identity_key(self) -> bytes:
        return self._identity.public_key

    def refute(self, claimed_incarnation: int) -> None:
        """Moves past a suspicion or death claimed about ``claimed_incarnation``."""
        self.incarnation = max(self.incarnation, claimed_incarnation) + 1

    def describe(self) -> common_pb2.SignedDescriptor:
        now_ms = int(time.time() * 1000)
        self._version = max(self._version + 1, now_ms)
        descriptor = common_pb2.NodeDescriptor(
            identity_key=self._identity.public_key,
            version=self._version,
            address=self._address(),
            roles=self._roles,
            onion_key=self._onion_key.public_key if self._onion_key else b"",
            issued_unix_ms=now_ms,
            incarnation=self.incarnation,
        )
        if self._fill is not None:
            self._fill(descriptor)
        return sign_descriptor(self._identity, descriptor)
