"""The native core (Rust, ``native/``): onion circuits, node identity, token-stream commitments.

Everything that runs per token or per cell is here. Import from this module, never from
``swarmserve._native`` directly: this facade is the supported surface.

- :class:`Identity`, :func:`verify_signature`, :func:`node_id`: Ed25519 node identity, stored as
  PKCS#8 PEM with mode 0600.
- :class:`OnionKey`, :class:`Circuit`, :class:`CircuitHop`, :class:`ReplayCache`: X25519 +
  HKDF-SHA256 + ChaCha20-Poly1305 onion layers. Set-up cells are always
  :data:`SETUP_CELL_SIZE` bytes at every hop, so a relay cannot tell its position on the path.
- :class:`TokenIssuer`, :class:`TokenRequest`: payment tokens (Privacy Pass style, RFC 9497 VOPRF):
  a provider issues blinded tokens and checks redeemed ones, which it cannot link to the payer.
- :class:`TokenStreamHasher`, :func:`token_stream_commitment`: the BLAKE3 hash chain an
  inference node signs over the tokens it serves.
- :class:`Sampler`, :func:`sampling_uniform`: verifiable sampling. The choice at every position
  follows from the logits and a uniform number derived from the receipt's seed, so verifiers can
  replay it; :meth:`Sampler.plausible` tolerates :data:`SAMPLING_CDF_TOLERANCE` (sampled) or
  :data:`SAMPLING_LOGIT_TOLERANCE` (greedy) of numerical jitter.

- :class:`LinkEngine`: the data plane's per-cell work (``native/src/link.rs``): circuits
  multiplexed over links, cells of many circuits batched per frame; peel, wrap, pass on and
  deliver, all native; set-ups handed back as events for the caller to admit.

- :func:`sida_split`, :func:`sida_combine`: S-IDA (secret sharing made short): a message split into
  ``n`` shares, any ``k`` of which rebuild it and fewer reveal nothing but its length (multipath
  circuits send one share per path).

- :class:`ConsensusNode`, :class:`ChainBlock`, :func:`decode_chain_block`, :func:`encode_chain_block`,
  :func:`verify_finalization`, :func:`verify_equivocation`, :func:`equivocation_epoch`: the ledger's
  chain. A validator (Commonware's simplex BFT consensus, marshal and authenticated p2p on its own
  thread) orders opaque transactions into blocks, one simplex engine per epoch among that epoch's
  committee; anyone checks a block's finalization certificate, or a validator's conflicting
  votes, from bytes and the committee's keys.
  :func:`sign_conflicting_votes` makes such evidence with a validator's own key, as an
  equivocating validator would (for adversarial tests).

Errors are subclasses of :class:`CryptoError` or :class:`ConsensusError`; bad argument values
raise :class:`ValueError`.
"""

from swarmserve._native import (
    CIRCUIT_READY,
    MAX_LAYERS,
    ROUTING_INFO_MAX,
    SAMPLING_CDF_TOLERANCE,
    SAMPLING_LOGIT_TOLERANCE,
    SAMPLING_PENALTY_WINDOW,
    SETUP_CELL_SIZE,
    SETUP_PAYLOAD_MAX,
    SIDA_MAX_SHARES,
    TAG_SIZE,
    TOKEN_BATCH_MAX,
    CellAuthenticationError,
    ChainBlock,
    Circuit,
    CircuitClosedError,
    CircuitHop,
    ConsensusError,
    ConsensusNode,
    ConsensusStoppedError,
    CryptoError,
    Identity,
    InvalidKeyError,
    KeyFileError,
    LinkEngine,
    MalformedCellError,
    MempoolFullError,
    OnionKey,
    PeeledSetup,
    ProofError,
    ReplayCache,
    ReplayCacheFullError,
    ReplayError,
    Sampler,
    SignatureError,
    TokenIssuer,
    TokenRequest,
    TokenStreamHasher,
    decode_chain_block,
    encode_chain_block,
    equivocation_epoch,
    node_id,
    sampling_uniform,
    sida_combine,
    sida_share_info,
    sida_split,
    sign_conflicting_votes,
    token_stream_commitment,
    verify_equivocation,
    verify_finalization,
    verify_signature,
)

__all__ = [
    "CIRCUIT_READY",
    "MAX_LAYERS",
    "ROUTING_INFO_MAX",
    "SAMPLING_CDF_TOLERANCE",
    "SAMPLING_LOGIT_TOLERANCE",
    "SAMPLING_PENALTY_WINDOW",
    "SETUP_CELL_SIZE",
    "SETUP_PAYLOAD_MAX",
    "SIDA_MAX_SHARES",
    "TAG_SIZE",
    "TOKEN_BATCH_MAX",
    "CellAuthenticationError",
    "ChainBlock",
    "Circuit",
    "CircuitClosedError",
    "CircuitHop",
    "ConsensusError",
    "ConsensusNode",
    "ConsensusStoppedError",
    "CryptoError",
    "Identity",
    "InvalidKeyError",
    "KeyFileError",
    "LinkEngine",
    "MalformedCellError",
    "MempoolFullError",
    "OnionKey",
    "PeeledSetup",
    "ProofError",
    "ReplayCache",
    "ReplayCacheFullError",
    "ReplayError",
    "Sampler",
    "SignatureError",
    "TokenIssuer",
    "TokenRequest",
    "TokenStreamHasher",
    "decode_chain_block",
    "encode_chain_block",
    "equivocation_epoch",
    "node_id",
    "sampling_uniform",
    "sida_combine",
    "sida_share_info",
    "sida_split",
    "sign_conflicting_votes",
    "token_stream_commitment",
    "verify_equivocation",
    "verify_finalization",
    "verify_signature",
]
