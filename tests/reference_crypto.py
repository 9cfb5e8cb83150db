"""An independent pure-Python implementation of the native core's wire formats.

Built only on the ``cryptography`` package (X25519, HKDF-SHA256, ChaCha20-Poly1305, Ed25519) and
the ``blake3`` package, from the specification in ``native/src/onion.rs`` and
``native/src/chain.rs``, sharing no code with the Rust crate. The tests check that each side
accepts what the other produces; ``bench/crypto.py`` uses it as the baseline the native module
is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blake3 import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SETUP_CELL_SIZE = 2048
MAX_LAYERS = 8
ROUTING_SLOT_SIZE = 128
KEY_SIZE = 32
TAG_SIZE = 16
LAYER_OVERHEAD = KEY_SIZE + TAG_SIZE
HOP_SPAN = ROUTING_SLOT_SIZE + LAYER_OVERHEAD
SETUP_CT_SIZE = SETUP_CELL_SIZE - LAYER_OVERHEAD
SLOT_FORWARD = 1
SLOT_FINAL = 2
HKDF_SALT = b"swarmserve/v1 onion hop"
HKDF_INFO = b"swarmserve/v1 onion keys"
ZERO_NONCE = bytes(12)


@dataclass
class HopSecrets:
    header: bytes
    forward: bytes
    backward: bytes
    replay_tag: bytes
    pad: bytes


def derive_hop_secrets(shared: bytes, ephemeral: bytes, onion_public: bytes) -> HopSecrets:
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=4 * KEY_SIZE + HOP_SPAN,
        salt=HKDF_SALT,
        info=HKDF_INFO + ephemeral + onion_public,
    ).derive(shared)
    return HopSecrets(okm[:32], okm[32:64], okm[64:96], okm[96:128], okm[128:])


def counter_nonce(counter: int) -> bytes:
    return counter.to_bytes(8, "little") + bytes(4)


def header_keystream(key: bytes, length: int) -> bytes:
    return ChaCha20Poly1305(key).encrypt(ZERO_NONCE, bytes(length), None)[:-TAG_SIZE]


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def slot(kind: int, routing_info: bytes) -> bytes:
    return bytes([kind, len(routing_info)]) + routing_info.ljust(ROUTING_SLOT_SIZE - 2, b"\0")


def seal_setup_layer(secrets: HopSecrets, ephemeral: bytes, plaintext: bytes) -> bytes:
    sealed = ChaCha20Poly1305(secrets.header).encrypt(ZERO_NONCE, plaintext, None)
    return ephemeral + sealed[-TAG_SIZE:] + sealed[:-TAG_SIZE]


@dataclass
class ReferenceCircuit:
    forward: list[ChaCha20Poly1305]
    backward: list[ChaCha20Poly1305]
    forward_counter: int = 0
    backward_counter: int = 0

    @classmethod
    def build(cls, hops: list[tuple[bytes, bytes]], payload: bytes) -> tuple[bytes, ReferenceCircuit]:
        secrets, ephemerals = [], []
        for onion_public, _ in hops:
            ephemeral = X25519PrivateKey.generate()
            ephemeral_public = ephemeral.public_key().public_bytes_raw()
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(onion_public))
            secrets.append(derive_hop_secrets(shared, ephemeral_public, onion_public))
            ephemerals.append(ephemeral_public)

        filler = b""
        for hop in secrets[:-1]:
            stream = header_keystream(hop.header, SETUP_CT_SIZE)
            filler = xor(filler, stream[SETUP_CT_SIZE - len(filler) :]) + hop.pad

        last = len(hops) - 1
        body = len(payload).to_bytes(2, "big") + payload
        head = slot(SLOT_FINAL, hops[last][1]) + body
        stream = header_keystream(secrets[last].header, SETUP_CT_SIZE)
        middle = bytes(SETUP_CT_SIZE - len(head) - len(filler))
        tail = xor(filler, stream[SETUP_CT_SIZE - len(filler) :])
        cell = seal_setup_layer(secrets[last], ephemerals[last], head + middle + tail)
        for j in reversed(range(last)):
            plaintext = slot(SLOT_FORWARD, hops[j][1]) + cell[: SETUP_CELL_SIZE - HOP_SPAN]
            cell = seal_setup_layer(secrets[j], ephemerals[j], plaintext)
        circuit = cls(
            forward=[ChaCha20Poly1305(s.forward) for s in secrets],
            backward=[ChaCha20Poly1305(s.backward) for s in secrets],
        )
        return cell, circuit

    def wrap_forward(self, plaintext: bytes) -> bytes:
        nonce = counter_nonce(self.forward_counter)
        for cipher in reversed(self.forward):
            plaintext = cipher.encrypt(nonce, plaintext, None)
        self.forward_counter += 1
        return plaintext

    def unwrap_backward(self, cell: bytes) -> bytes:
        nonce = counter_nonce(self.backward_counter)
        for cipher in self.backward:
            cell = cipher.decrypt(nonce, cell, None)
        self.backward_counter += 1
        return cell


@dataclass
class ReferenceHop:
    forward: ChaCha20Poly1305
    backward: ChaCha20Poly1305
    forward_counter: int = 0
    backward_counter: int = 0

    def peel_forward(self, cell: bytes) -> bytes:
        out = self.forward.decrypt(counter_nonce(self.forward_counter), cell, None)
        self.forward_counter += 1
        return out

    def wrap_backward(self, cell: bytes) -> bytes:
        out = self.backward.encrypt(counter_nonce(self.backward_counter), cell, None)
        self.backward_counter += 1
        return out


@dataclass
class ReferencePeeled:
    is_final: bool
    routing_info: bytes
    next_cell: bytes | None
    payload: bytes | None
    replay_tag: bytes
    hop: ReferenceHop = field(repr=False)


def peel_setup(onion_secret: bytes, cell: bytes) -> ReferencePeeled:
    """Peels one set-up layer (raises ``cryptography.exceptions.InvalidTag`` if tampered)."""
    if len(cell) != SETUP_CELL_SIZE:
        raise ValueError(f"set-up cell is {len(cell)} bytes")
    private = X25519PrivateKey.from_private_bytes(onion_secret)
    ephemeral, tag, ciphertext = cell[:32], cell[32:48], cell[48:]
    shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    secrets = derive_hop_secrets(shared, ephemeral, private.public_key().public_bytes_raw())
    plaintext = ChaCha20Poly1305(secrets.header).decrypt(ZERO_NONCE, ciphertext + tag, None)
    kind, length = plaintext[0], plaintext[1]
    routing_info = plaintext[2 : 2 + length]
    hop = ReferenceHop(ChaCha20Poly1305(secrets.forward), ChaCha20Poly1305(secrets.backward))
    rest = plaintext[ROUTING_SLOT_SIZE:]
    if kind == SLOT_FORWARD:
        return ReferencePeeled(False, routing_info, rest + secrets.pad, None, secrets.replay_tag, hop)
    size = int.from_bytes(rest[:2], "big")
    return ReferencePeeled(True, routing_info, None, rest[2 : 2 + size], secrets.replay_tag, hop)


# --- token-stream commitments -----------------------------------------------------------------


def _domain_key(context: str) -> bytes:
    return blake3(b"", derive_key_context=context).digest()


HEADER_KEY = _domain_key("swarmserve v1 token-stream header")
LINK_KEY = _domain_key("swarmserve v1 token-stream link")
COMMIT_KEY = _domain_key("swarmserve v1 token-stream commitment")


def token_stream_commitment(
    request_id: bytes,
    model_digest: bytes,
    prompt_digest: bytes,
    sampling: bytes,
    tokens: list[tuple[int, bytes]],
) -> bytes:
    u32 = lambda n: n.to_bytes(4, "little")  # noqa: E731
    u64 = lambda n: n.to_bytes(8, "little")  # noqa: E731
    head = blake3(
        u32(len(request_id)) + request_id + model_digest + prompt_digest + u32(len(sampling)) + sampling,
        key=HEADER_KEY,
    ).digest()
    for index, (token_id, text) in enumerate(tokens, start=1):
        head = blake3(head + u64(index) + u32(token_id) + u32(len(text)) + text, key=LINK_KEY).digest()
    return blake3(head + u64(len(tokens)), key=COMMIT_KEY).digest()


def node_id(public_key: bytes) -> str:
    return blake3(public_key, derive_key_context="swarmserve v1 node id").hexdigest()
