"""The native core against independent implementations (``cryptography``, ``blake3``) and
against bad input: every tampered, truncated, replayed or wrongly keyed cell must be refused
with the right exception, and nothing is accepted that should not be."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmserve import native
from tests import reference_crypto as ref

routing_infos = st.binary(max_size=native.ROUTING_INFO_MAX)
payloads = st.binary(max_size=native.SETUP_PAYLOAD_MAX)
cells = st.lists(st.binary(min_size=0, max_size=2048), min_size=1, max_size=4)
relaxed = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- onion circuits: native <-> reference ---------------------------------------------------


def native_build(hops: list[tuple[bytes, bytes]], payload: bytes) -> tuple[bytes, Any]:
    return native.Circuit.build(hops, payload)


def native_peel(key: native.OnionKey, cell: bytes) -> Any:
    return key.peel_setup(cell)


def reference_peel(key: native.OnionKey, cell: bytes) -> Any:
    return ref.peel_setup(key.secret_bytes(), cell)


# Each direction: who builds the onion and seals data at the router, who peels at the hops.
DIRECTIONS = {
    "native-router-reference-hops": (native_build, reference_peel),
    "reference-router-native-hops": (ref.ReferenceCircuit.build, native_peel),
}


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@relaxed
@given(
    routes=st.lists(routing_infos, min_size=1, max_size=native.MAX_LAYERS),
    payload=payloads,
    forward=cells,
    backward=cells,
)
def test_onions_interoperate_with_the_reference(
    direction: str, routes: list[bytes], payload: bytes, forward: list[bytes], backward: list[bytes]
) -> None:
    build, peel = DIRECTIONS[direction]
    keys = [native.OnionKey.generate() for _ in routes]
    cell, circuit = build([(k.public_key, r) for k, r in zip(keys, routes, strict=True)], payload)
    hops = []
    for index, (key, route) in enumerate(zip(keys, routes, strict=True)):
        assert len(cell) == native.SETUP_CELL_SIZE  # same size at every position
        peeled = peel(key, cell)
        assert peeled.routing_info == route
        assert peeled.is_final == (index == len(keys) - 1)
        hops.append(peeled.hop)
        if peeled.is_final:
            assert peeled.payload == payload and peeled.next_cell is None
        else:
            assert peeled.next_cell is not None and peeled.payload is None
            cell = peeled.next_cell
    for message in forward:
        data = circuit.wrap_forward(message)
        for hop in hops:
            data = hop.peel_forward(data)
        assert data == message
    for message in backward:
        data = message
        for hop in reversed(hops):
            data = hop.wrap_backward(data)
        assert circuit.unwrap_backward(data) == message


def test_replay_tags_agree_between_implementations() -> None:
    key = native.OnionKey.generate()
    cell, _ = native.Circuit.build([(key.public_key, b"")])
    assert key.peel_setup(cell).replay_tag == ref.peel_setup(key.secret_bytes(), cell).replay_tag


def establish(
    layers: int,
) -> tuple[native.Circuit, list[native.CircuitHop], list[native.OnionKey], bytes]:
    keys = [native.OnionKey.generate() for _ in range(layers)]
    first_cell, circuit = native.Circuit.build([(k.public_key, b"next") for k in keys], b"payload")
    cell = first_cell
    hops = []
    for key in keys:
        peeled = key.peel_setup(cell)
        hops.append(peeled.hop)
        cell = peeled.next_cell or b""
    return circuit, hops, keys, first_cell


# --- bad input: set-up cells ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    position=st.integers(0, native.SETUP_CELL_SIZE - 1),
    flip=st.integers(1, 255),
    hop=st.integers(0, 2),
)
def test_any_flipped_setup_byte_at_any_hop_is_rejected(position: int, flip: int, hop: int) -> None:
    """Tried: one byte of the set-up cell changed, at the first, middle or last hop."""
    keys = [native.OnionKey.generate() for _ in range(3)]
    cell, _ = native.Circuit.build([(k.public_key, b"x") for k in keys])
    for key in keys[:hop]:
        cell = key.peel_setup(cell).next_cell or b""
    tampered = bytearray(cell)
    tampered[position] ^= flip
    with pytest.raises(native.CellAuthenticationError):
        keys[hop].peel_setup(bytes(tampered))


@pytest.mark.parametrize("size", [0, 1, 47, 48, native.SETUP_CELL_SIZE - 1, native.SETUP_CELL_SIZE + 1])
def test_wrong_size_setup_cell_is_malformed(size: int) -> None:
    """Tried: truncated and over-long set-up cells."""
    key = native.OnionKey.generate()
    cell, _ = native.Circuit.build([(key.public_key, b"")])
    wrong = (cell * 2)[:size]
    with pytest.raises(native.MalformedCellError, match="set-up cell"):
        key.peel_setup(wrong)


def test_setup_under_the_wrong_key_fails_authentication() -> None:
    key = native.OnionKey.generate()
    cell, _ = native.Circuit.build([(key.public_key, b"")])
    with pytest.raises(native.CellAuthenticationError):
        native.OnionKey.generate().peel_setup(cell)


def test_replayed_setup_is_refused_and_distinct_setups_are_not() -> None:
    key = native.OnionKey.generate()
    cache = native.ReplayCache(1024, 600.0)
    cell, _ = native.Circuit.build([(key.public_key, b"")])
    cache.check_and_remember(key.peel_setup(cell).replay_tag)
    with pytest.raises(native.ReplayError):
        cache.check_and_remember(key.peel_setup(cell).replay_tag)
    other, _ = native.Circuit.build([(key.public_key, b"")])
    cache.check_and_remember(key.peel_setup(other).replay_tag)  # a new set-up to the same relay is fine
    assert len(cache) == 2


def test_full_replay_cache_refuses_instead_of_forgetting() -> None:
    key = native.OnionKey.generate()
    cache = native.ReplayCache(1, 600.0)
    cache.check_and_remember(key.peel_setup(native.Circuit.build([(key.public_key, b"")])[0]).replay_tag)
    with pytest.raises(native.ReplayCacheFullError):
        cache.check_and_remember(key.peel_setup(native.Circuit.build([(key.public_key, b"")])[0]).replay_tag)


def test_expired_replay_tags_are_forgotten() -> None:
    cache = native.ReplayCache(4, 0.0)
    cache.check_and_remember(bytes(32))
    cache.check_and_remember(bytes(32))  # ttl 0: already expired
    with pytest.raises(ValueError, match="32 bytes"):
        cache.check_and_remember(b"short")
    with pytest.raises(ValueError, match="ttl_seconds"):
        native.ReplayCache(4, -1.0)


def test_build_rejects_bad_paths_and_sizes() -> None:
    good = native.OnionKey.generate().public_key
    with pytest.raises(ValueError, match="1 to 8 layers"):
        native.Circuit.build([])
    with pytest.raises(ValueError, match="1 to 8 layers"):
        native.Circuit.build([(good, b"")] * (native.MAX_LAYERS + 1))
    with pytest.raises(ValueError, match="routing info"):
        native.Circuit.build([(good, b"a" * (native.ROUTING_INFO_MAX + 1))])
    with pytest.raises(ValueError, match="payload"):
        native.Circuit.build([(good, b"")], b"p" * (native.SETUP_PAYLOAD_MAX + 1))
    with pytest.raises(native.InvalidKeyError, match="32 bytes"):
        native.Circuit.build([(good[:31], b"")])
    with pytest.raises(native.InvalidKeyError, match="low-order"):
        native.Circuit.build([(bytes(32), b"")])


# --- bad input: data cells ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(message=st.binary(min_size=1, max_size=256), data=st.data())
def test_any_flipped_forward_byte_is_caught_and_closes_the_hop(message: bytes, data: st.DataObject) -> None:
    """Tried: one byte of a forward cell changed before a random hop."""
    circuit, hops, _, _ = establish(3)
    cell = circuit.wrap_forward(message)
    at = data.draw(st.integers(0, 2))
    for hop in hops[:at]:
        cell = hop.peel_forward(cell)
    tampered = bytearray(cell)
    tampered[data.draw(st.integers(0, len(cell) - 1))] ^= data.draw(st.integers(1, 255))
    with pytest.raises(native.CellAuthenticationError):
        hops[at].peel_forward(bytes(tampered))
    with pytest.raises(native.CircuitClosedError):
        hops[at].peel_forward(cell)  # even the genuine cell: the hop is closed for good


@settings(max_examples=60, deadline=None)
@given(message=st.binary(max_size=256), data=st.data())
def test_any_flipped_backward_byte_is_caught_at_the_router(message: bytes, data: st.DataObject) -> None:
    circuit, hops, _, _ = establish(3)
    cell = message
    for hop in reversed(hops):
        cell = hop.wrap_backward(cell)
    tampered = bytearray(cell)
    tampered[data.draw(st.integers(0, len(cell) - 1))] ^= data.draw(st.integers(1, 255))
    with pytest.raises(native.CellAuthenticationError):
        circuit.unwrap_backward(bytes(tampered))
    with pytest.raises(native.CircuitClosedError):
        circuit.unwrap_backward(cell)


def test_truncated_reordered_and_replayed_data_cells_are_rejected() -> None:
    circuit, hops, _, _ = establish(3)
    with pytest.raises(native.MalformedCellError):
        hops[0].peel_forward(b"\0" * (native.TAG_SIZE - 1))
    circuit, hops, _, _ = establish(3)
    with pytest.raises(native.CellAuthenticationError):
        hops[0].peel_forward(circuit.wrap_forward(b"token")[:-1])
    circuit, hops, _, _ = establish(3)
    first, second = circuit.wrap_forward(b"a"), circuit.wrap_forward(b"b")
    with pytest.raises(native.CellAuthenticationError):
        hops[0].peel_forward(second)  # delivered out of order
    circuit, hops, _, _ = establish(1)
    cell = circuit.wrap_forward(b"a")
    hops[0].peel_forward(cell)
    with pytest.raises(native.CellAuthenticationError):
        hops[0].peel_forward(cell)  # the same cell again
    with pytest.raises(native.MalformedCellError):
        circuit.unwrap_backward(b"")
    assert first != second


def test_a_cell_for_another_circuit_fails() -> None:
    circuit_a, _, _, _ = establish(2)
    _, hops_b, _, _ = establish(2)
    with pytest.raises(native.CellAuthenticationError):
        hops_b[0].peel_forward(circuit_a.wrap_forward(b"hello"))


def test_large_cells_round_trip_without_the_gil() -> None:
    circuit, hops, _, _ = establish(3)
    big = os.urandom(64 * 1024)
    cell = circuit.wrap_forward(big)
    assert len(cell) == len(big) + 3 * native.TAG_SIZE
    for hop in hops:
        cell = hop.peel_forward(cell)
    assert cell == big


# --- identity -------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=1024))
def test_signatures_interoperate_with_cryptography(message: bytes) -> None:
    identity = native.Identity.generate()
    Ed25519PublicKey.from_public_bytes(identity.public_key).verify(identity.sign(message), message)
    other = Ed25519PrivateKey.generate()
    other_public = other.public_key().public_bytes_raw()
    native.verify_signature(other_public, message, other.sign(message))
    with pytest.raises(native.SignatureError):
        native.verify_signature(other_public, message + b"!", other.sign(message))


def test_forged_and_malformed_signatures_are_rejected() -> None:
    identity = native.Identity.generate()
    signature = bytearray(identity.sign(b"m"))
    signature[10] ^= 1
    with pytest.raises(native.SignatureError):
        native.verify_signature(identity.public_key, b"m", bytes(signature))
    with pytest.raises(native.SignatureError, match="64 bytes"):
        native.verify_signature(identity.public_key, b"m", b"short")
    with pytest.raises(native.InvalidKeyError):
        native.verify_signature(b"\x01" * 31, b"m", identity.sign(b"m"))
    with pytest.raises(InvalidSignature):
        Ed25519PublicKey.from_public_bytes(identity.public_key).verify(bytes(signature), b"m")


def test_key_pems_interoperate_with_cryptography() -> None:
    identity = native.Identity.generate()
    loaded = serialization.load_pem_private_key(identity.to_pem().encode(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.public_key().public_bytes_raw() == identity.public_key
    theirs = Ed25519PrivateKey.generate()
    pem = theirs.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    assert native.Identity.from_pem(pem).public_key == theirs.public_key().public_bytes_raw()

    onion = native.OnionKey.generate()
    x_loaded = serialization.load_pem_private_key(onion.to_pem().encode(), password=None)
    assert isinstance(x_loaded, X25519PrivateKey)
    assert x_loaded.public_key().public_bytes_raw() == onion.public_key
    x_theirs = X25519PrivateKey.generate()
    x_pem = x_theirs.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    assert native.OnionKey.from_pem(x_pem).public_key == x_theirs.public_key().public_bytes_raw()

    with pytest.raises(native.InvalidKeyError):
        native.OnionKey.from_pem(identity.to_pem())
    with pytest.raises(native.InvalidKeyError):
        native.Identity.from_pem("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")


def test_key_files_are_owner_only_and_unsafe_ones_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    identity = native.Identity.generate()
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert native.Identity.load(path).public_key == identity.public_key
    path.chmod(0o640)
    with pytest.raises(native.KeyFileError, match="chmod 600"):
        native.Identity.load(path)
    with pytest.raises(native.KeyFileError):
        native.OnionKey.load(tmp_path / "missing.key")


def test_node_id_matches_the_reference() -> None:
    identity = native.Identity.generate()
    assert identity.node_id == native.node_id(identity.public_key) == ref.node_id(identity.public_key)


# --- token-stream commitments ---------------------------------------------------------------

token_streams = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=200)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(
    request_id=st.binary(max_size=64),
    model=st.binary(min_size=32, max_size=32),
    prompt=st.binary(min_size=32, max_size=32),
    sampling=st.binary(max_size=100),
    tokens=token_streams,
)
def test_commitments_match_the_blake3_reference(
    request_id: bytes, model: bytes, prompt: bytes, sampling: bytes, tokens: list[tuple[int, bytes]]
) -> None:
    expected = ref.token_stream_commitment(request_id, model, prompt, sampling, tokens)
    hasher = native.TokenStreamHasher(request_id, model, prompt, sampling)
    for token_id, text in tokens:
        hasher.update(token_id, text)
    assert hasher.count == len(tokens)
    assert hasher.commitment() == expected
    ids, texts = [t[0] for t in tokens], [t[1] for t in tokens]
    assert native.token_stream_commitment(request_id, model, prompt, sampling, ids, texts) == expected


def test_commitment_changes_when_any_token_does() -> None:
    args = (b"r", bytes(32), bytes(32), b"greedy")
    base = native.token_stream_commitment(*args, [1, 2, 3], [b"a", b"b", b"c"])
    assert native.token_stream_commitment(*args, [1, 2, 4], [b"a", b"b", b"c"]) != base
    assert native.token_stream_commitment(*args, [1, 2, 3], [b"a", b"b", b"C"]) != base
    assert native.token_stream_commitment(*args, [1, 2], [b"a", b"b"]) != base


def test_commitment_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="model_digest must be 32 bytes"):
        native.TokenStreamHasher(b"r", bytes(31), bytes(32), b"")
    with pytest.raises(ValueError, match="2 token ids but 1 texts"):
        native.token_stream_commitment(b"r", bytes(32), bytes(32), b"", [1, 2], [b"a"])
    hasher = native.TokenStreamHasher(b"r", bytes(32), bytes(32), b"")
    with pytest.raises(OverflowError):
        hasher.update(2**32, b"x")
    with pytest.raises(OverflowError):
        hasher.update(-1, b"x")
    assert hasher.count == 0


# --- no panic crosses the boundary ----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    garbage=st.one_of(
        st.binary(max_size=3000),
        st.binary(min_size=native.SETUP_CELL_SIZE, max_size=native.SETUP_CELL_SIZE),
    )
)
def test_arbitrary_bytes_raise_only_crypto_errors(garbage: bytes) -> None:
    """Tried: random bytes of every length into each entry point that takes peer data. The
    only acceptable outcome is a CryptoError subclass (a pyo3 PanicException is not one)."""
    key = native.OnionKey.generate()
    with pytest.raises(native.CryptoError):
        key.peel_setup(garbage)
    circuit, hops, _, _ = establish(2)
    with pytest.raises(native.CryptoError):
        hops[0].peel_forward(garbage)
    with pytest.raises(native.CryptoError):
        circuit.unwrap_backward(garbage)
    for call in (native.Identity.from_pem, native.OnionKey.from_pem):
        with pytest.raises(native.CryptoError):
            call(garbage.decode("latin-1"))
    with pytest.raises(native.CryptoError):
        native.verify_signature(native.Identity.generate().public_key, garbage, garbage[:64])
