"""The native core (Rust, ``native/``): onion circuits, node identity, token-stream commitments.

Everything that runs per token or per cell is here. Import from this module, never from
``swarmserve._native`` directly: this facade is the supported surface.

- :class:`Identity`, :func:`verify_signature`, :func:`node_id`: Ed25519 node identity, stored as
  PKCS#8 PEM with mode 0600.
- :class:`OnionKey`, :class:`Circuit`, :class:`CircuitHop`, :class:`ReplayCache`: X25519 +
  HKDF-SHA256 + ChaCha20-Poly1305 onion layers. Set-up cells are always
  :data:`SETUP_CELL_SIZE` bytes at every hop, so a relay cannot tell its position on the path.
- :class:`TokenStreamHasher`, :func:`token_stream_commitment`: the BLAKE3 hash chain an
  inference node signs over the tokens it serves.

Errors are subclasses of :class:`CryptoError`; bad argument values raise :class:`ValueError`.
"""

from swarmserve._native import (
    MAX_LAYERS,
    ROUTING_INFO_MAX,
    SETUP_CELL_SIZE,
    SETUP_PAYLOAD_MAX,
    TAG_SIZE,
    CellAuthenticationError,
    Circuit,
    CircuitClosedError,
    CircuitHop,
    CryptoError,
    Identity,
    InvalidKeyError,
    KeyFileError,
    MalformedCellError,
    OnionKey,
    PeeledSetup,
    ReplayCache,
    ReplayCacheFullError,
    ReplayError,
    SignatureError,
    TokenStreamHasher,
    node_id,
    token_stream_commitment,
    verify_signature,
)

__all__ = [
    "MAX_LAYERS",
    "ROUTING_INFO_MAX",
    "SETUP_CELL_SIZE",
    "SETUP_PAYLOAD_MAX",
    "TAG_SIZE",
    "CellAuthenticationError",
    "Circuit",
    "CircuitClosedError",
    "CircuitHop",
    "CryptoError",
    "Identity",
    "InvalidKeyError",
    "KeyFileError",
    "MalformedCellError",
    "OnionKey",
    "PeeledSetup",
    "ReplayCache",
    "ReplayCacheFullError",
    "ReplayError",
    "SignatureError",
    "TokenStreamHasher",
    "node_id",
    "token_stream_commitment",
    "verify_signature",
]
