"""Authenticated gossip: every Swim packet, Exchange request and Exchange answer is signed by
its sender, and every suspicion names and is signed by its claimant.

Invariants:

- A message is used only if its sender descriptor verifies under its own identity key, was issued
  within ``MAX_SKEW_MS`` of the receiver's clock, and the message's signature verifies under that
  key. Nobody on the wire can change a field of a message, and a recorded message is refused a
  minute later.
- A SUSPECT claim (or a DEAD claim without the member's own leave) counts only with its
  claimant's signature over the member, the incarnation and the claimant; a liar cannot make one
  claim count as many (see ``suspicion.py``).
- All of it runs in :func:`open_message`, in one go per message, so the caller can run it off
  the event loop (it is signature checks and nothing else).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TypeVar

from swarmserve import native
from swarmserve.overlay.descriptors import DescriptorError, open_descriptor
from swarmserve.v1 import common_pb2, overlay_pb2

__all__ = [
    "MAX_SKEW_MS",
    "OpenedMessage",
    "PacketError",
    "claim_message",
    "leave_message",
    "open_message",
    "sign_claim",
    "sign_message",
]

MAX_SKEW_MS = 60_000
_DOMAIN = b"swarmserve-gossip-v1\x00"
_CLAIM_DOMAIN = b"swarmserve-suspect-v1"
_LEAVE_DOMAIN = b"swarmserve-leave-v1"

Message = TypeVar("Message", overlay_pb2.SwimPacket, overlay_pb2.ExchangeRequest, overlay_pb2.ExchangeResponse)


class PacketError(Exception):
    """A gossip message that must not be used; the message says why."""


def _signed_bytes(
    message: overlay_pb2.SwimPacket | overlay_pb2.ExchangeRequest | overlay_pb2.ExchangeResponse,
) -> bytes:
    signature = message.signature
    message.signature = b""
    try:
        body = message.SerializeToString(deterministic=True)
    finally:
        message.signature = signature
    return _DOMAIN + message.DESCRIPTOR.full_name.encode() + b"\x00" + body


def sign_message(identity: native.Identity, message: Message) -> Message:
    """Signs ``message`` (whose ``sender`` must be ``identity``'s own descriptor) in place."""
    message.signature = identity.sign(_signed_bytes(message))
    return message


def leave_message(identity_key: bytes, incarnation: int) -> bytes:
    """What a member signs to leave: only it can declare itself dead at once."""
    return _LEAVE_DOMAIN + identity_key + incarnation.to_bytes(8, "big")


def claim_message(identity_key: bytes, incarnation: int, claimant: bytes) -> bytes:
    """What a claimant signs to suspect ``identity_key`` at ``incarnation``."""
    return _CLAIM_DOMAIN + identity_key + incarnation.to_bytes(8, "big") + claimant


def sign_claim(identity: native.Identity, update: overlay_pb2.MemberUpdate) -> overlay_pb2.MemberUpdate:
    update.claimant = identity.public_key
    update.claim_signature = identity.sign(claim_message(update.identity_key, update.incarnation, update.claimant))
    return update


def _verified(key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        native.verify_signature(key, message, signature)
    except (native.CryptoError, ValueError):
        return False
    return True


@dataclass
class OpenedMessage:
    """A message whose sender checked out: its descriptor, and the news inside that verified
    (descriptors with their opened form; claims with whether they are the member's own leave).
    News that did not verify is left out: one bad piece costs only itself."""

    sender: common_pb2.NodeDescriptor
    descriptors: list[tuple[common_pb2.SignedDescriptor, common_pb2.NodeDescriptor]] = field(default_factory=list)
    claims: list[tuple[overlay_pb2.MemberUpdate, bool]] = field(default_factory=list)


def open_message(message: Message, now_ms: int | None = None) -> OpenedMessage:
    """Checks the sender and its signature (raises :class:`PacketError`), then every descriptor
    and claim inside (those that fail are left out, so one bad piece of news costs only itself)."""
    if not message.HasField("sender"):
        raise PacketError("the message names no sender")
    try:
        sender = open_descriptor(message.sender)
    except DescriptorError as error:
        raise PacketError(f"the sender's descriptor is invalid: {error}") from None
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(sender.issued_unix_ms - now_ms) > MAX_SKEW_MS:
        raise PacketError("the sender's descriptor was not issued for this message (stale or from the future)")
    if not _verified(sender.identity_key, _signed_bytes(message), message.signature):
        raise PacketError("the message's signature does not verify under its sender's key")
    opened = OpenedMessage(sender, [(message.sender, sender)])
    pushed: list[common_pb2.SignedDescriptor] = []
    if isinstance(message, overlay_pb2.SwimPacket):
        for update in message.updates:
            if update.descriptor.descriptor:
                pushed.append(update.descriptor)
                continue
            if update.incarnation >= 2**64:
                continue
            if update.state == overlay_pb2.MEMBER_STATE_DEAD and _verified(
                update.identity_key, leave_message(update.identity_key, update.incarnation), update.leave_signature
            ):
                opened.claims.append((update, True))
            elif len(update.claimant) == 32 and _verified(
                update.claimant, claim_message(update.identity_key, update.incarnation, update.claimant),
                update.claim_signature,
            ):  # fmt: skip
                opened.claims.append((update, False))
    else:
        pushed.extend(message.updates)
    for signed in pushed:
        try:
            opened.descriptors.append((signed, open_descriptor(signed)))
        except DescriptorError:
            continue
    return opened
