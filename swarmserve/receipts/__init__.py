"""Signed receipts over served token streams: written by inference nodes, checked by routers and
verifiers. A receipt commits (native BLAKE3 hash chain) to exactly the tokens sent, with the
request id, model digest, prompt digest and sampling parameters (seed included), and is signed
with the node's Ed25519 identity. Anyone with the node's public key and the tokens can check it.

A stream that a node could not finish is resumed on another node, so one answer may be served in
segments. Invariants a client can check (:func:`verify_segments`, :func:`verify_stream_receipt`):
- every token the client received is covered by exactly one segment's receipt, signed by the node
  that served it: a node signs a *checkpoint* (the receipt of the stream so far, finish reason
  UNSPECIFIED) with every token it sends, so a node that dies mid-stream has signed what it served;
- a segment commits to the tokens it continued from (``prefix_tokens``, ``prefix_digest``), so
  segments cannot be reordered, dropped or spliced onto another stream;
- every segment names the same model, prompt and sampling (seed included); only the last one
  says why the stream ended;
- the router signs one :class:`StreamReceipt` over the digests of all segments, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from blake3 import blake3
from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.v1 import common_pb2, router_pb2

__all__ = [
    "RECEIPT_VERSION",
    "ReceiptError",
    "ReceiptWriter",
    "checkpoint_receipt",
    "prompt_digest",
    "sampling_bytes",
    "sampling_mismatch",
    "sign_stream_receipt",
    "verify_receipt",
    "verify_segments",
    "verify_stream_receipt",
]

RECEIPT_VERSION = 1
STREAM_RECEIPT_VERSION = 1


class ReceiptError(Exception):
    """A receipt that does not check out; the message says which check failed."""


def prompt_digest(prompt_ids: Sequence[int]) -> bytes:
    """BLAKE3 of the prompt token ids, each as a little-endian u32."""
    return blake3(b"".join(token.to_bytes(4, "little") for token in prompt_ids)).digest()


def sampling_bytes(sampling: common_pb2.SamplingParams) -> bytes:
    """The bytes of the sampling parameters that the hash chain's header commits to."""
    return sampling.SerializeToString(deterministic=True)


def _body(
    header: common_pb2.Receipt,
    token_count: int,
    commitment: bytes,
    finish_reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED,
    timing: common_pb2.Timing | None = None,
) -> bytes:
    """The bytes a node signs: ``header`` with the tokens' count and commitment (and, at the end,
    the finish reason and timing). A checkpoint leaves the last two unset."""
    receipt = common_pb2.Receipt()
    receipt.CopyFrom(header)
    receipt.token_count = token_count
    receipt.commitment = commitment
    receipt.finish_reason = finish_reason
    if timing is not None:
        receipt.timing.CopyFrom(timing)
    return receipt.SerializeToString(deterministic=True)


class ReceiptWriter:
    """Feeds every token sent into the hash chain, signing a checkpoint for each, then signs the
    receipt. ``prefix_ids``: the tokens a resumed stream continues from (served before)."""

    def __init__(
        self,
        identity: native.Identity,
        request_id: str,
        model_digest: bytes,
        prompt_ids: Sequence[int],
        sampling: common_pb2.SamplingParams,
        prefix_ids: Sequence[int] = (),
    ) -> None:
        self._identity = identity
        self._receipt = common_pb2.Receipt(
            version=RECEIPT_VERSION,
            request_id=request_id,
            node_key=identity.public_key,
            model_digest=model_digest,
            prompt_digest=prompt_digest(prompt_ids),
            sampling=sampling,
            prefix_tokens=len(prefix_ids),
            prefix_digest=prompt_digest(prefix_ids) if prefix_ids else b"",
        )
        self._chain = native.TokenStreamHasher(
            request_id.encode(), model_digest, self._receipt.prompt_digest, sampling_bytes(sampling)
        )

    def header(self) -> bytes:
        """What checkpoints extend (sent with the first token: ``InferenceToken.receipt_header``)."""
        return self._receipt.SerializeToString(deterministic=True)

    def add(self, token_id: int, text: bytes) -> bytes:
        """Adds a token; returns the checkpoint: the signature over the receipt of every token so far."""
        self._chain.update(token_id, text)
        return self._identity.sign(_body(self._receipt, self._chain.count, self._chain.commitment()))

    def sign(
        self, finish_reason: common_pb2.FinishReason.ValueType, timing: common_pb2.Timing
    ) -> common_pb2.SignedReceipt:
        body = _body(self._receipt, self._chain.count, self._chain.commitment(), finish_reason, timing)
        return common_pb2.SignedReceipt(receipt=body, signature=self._identity.sign(body))


def _commitment(header: common_pb2.Receipt, token_ids: Sequence[int], texts: Sequence[bytes]) -> bytes:
    """The hash chain over these tokens under the receipt's header (ValueError if malformed)."""
    return native.token_stream_commitment(
        header.request_id.encode(),
        header.model_digest,
        header.prompt_digest,
        sampling_bytes(header.sampling),
        list(token_ids),
        list(texts),
    )


def checkpoint_receipt(
    header: bytes, signature: bytes, token_ids: Sequence[int], texts: Sequence[bytes]
) -> common_pb2.SignedReceipt:
    """The signed receipt of a stream cut after ``token_ids``: the node's ``header`` and its last
    checkpoint ``signature``, which must cover exactly these tokens. Raises :class:`ReceiptError`."""
    try:
        parsed = common_pb2.Receipt.FromString(header)
        commitment = _commitment(parsed, token_ids, texts)
    except (DecodeError, ValueError) as error:
        raise ReceiptError(f"the stream's receipt header is malformed: {error}") from None
    if parsed.token_count or parsed.commitment or parsed.finish_reason or parsed.HasField("timing"):
        raise ReceiptError("the stream's receipt header already names tokens")
    signed = common_pb2.SignedReceipt(receipt=_body(parsed, len(token_ids), commitment), signature=signature)
    verify_receipt(signed, token_ids, texts)
    return signed


def verify_receipt(
    signed: common_pb2.SignedReceipt,
    token_ids: Sequence[int],
    texts: Sequence[bytes],
    *,
    node_key: bytes | None = None,
) -> common_pb2.Receipt:
    """Checks the signature (by ``node_key`` if given) and that the receipt commits to exactly
    these tokens; returns the receipt body. Raises :class:`ReceiptError` naming the failed check."""
    try:
        receipt = common_pb2.Receipt.FromString(signed.receipt)
    except DecodeError as error:
        raise ReceiptError(f"receipt body is not a Receipt message: {error}") from None
    if receipt.version != RECEIPT_VERSION:
        raise ReceiptError(f"receipt version {receipt.version} is not {RECEIPT_VERSION}")
    if node_key is not None and receipt.node_key != node_key:
        raise ReceiptError("receipt is signed by another node than the one that served the stream")
    try:
        native.verify_signature(receipt.node_key, signed.receipt, signed.signature)
    except native.CryptoError as error:
        raise ReceiptError(f"receipt signature is invalid: {error}") from None
    if receipt.token_count != len(token_ids):
        raise ReceiptError(f"receipt covers {receipt.token_count} tokens, the stream had {len(token_ids)}")
    try:
        expected = _commitment(receipt, token_ids, texts)
    except ValueError as error:
        raise ReceiptError(f"receipt header is malformed: {error}") from None
    if expected != receipt.commitment:
        raise ReceiptError("receipt commitment does not match the tokens received")
    return receipt


def verify_segments(
    segments: Sequence[common_pb2.SignedReceipt], token_ids: Sequence[int], texts: Sequence[bytes]
) -> list[common_pb2.Receipt]:
    """Checks that ``segments``, in order, are the receipts of one stream made of exactly these
    tokens (see the module's invariants); returns their bodies. Raises :class:`ReceiptError`."""
    if not segments:
        raise ReceiptError("a stream has at least one segment")
    if len(token_ids) != len(texts):
        raise ReceiptError(f"{len(token_ids)} token ids but {len(texts)} token texts")
    bodies: list[common_pb2.Receipt] = []
    start = 0
    for i, signed in enumerate(segments):
        try:
            claimed = common_pb2.Receipt.FromString(signed.receipt)
        except DecodeError as error:
            raise ReceiptError(f"segment {i}'s receipt is not a Receipt message: {error}") from None
        if claimed.prefix_tokens != start:
            raise ReceiptError(f"segment {i} continues after {claimed.prefix_tokens} tokens, not after {start}")
        expected_prefix = prompt_digest(token_ids[:start]) if start else b""
        if claimed.prefix_digest != expected_prefix:
            raise ReceiptError(f"segment {i} continues from other tokens than the stream's first {start}")
        end = start + claimed.token_count
        if end > len(token_ids):
            raise ReceiptError(f"segment {i} covers tokens up to {end}; the stream has {len(token_ids)}")
        try:
            body = verify_receipt(signed, token_ids[start:end], texts[start:end])
        except ReceiptError as error:
            raise ReceiptError(f"segment {i}: {error}") from None
        last = i == len(segments) - 1
        if not last and (body.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED or not body.token_count):
            raise ReceiptError(f"segment {i} is not a cut segment (it ends the stream or holds no token)")
        if last and body.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
            raise ReceiptError("the last segment is a checkpoint: the stream did not end")
        if bodies:
            first = bodies[0]
            if (body.model_digest, body.prompt_digest) != (first.model_digest, first.prompt_digest):
                raise ReceiptError(f"segment {i} names another model or prompt than segment 0")
            if sampling_bytes(body.sampling) != sampling_bytes(first.sampling):
                raise ReceiptError(f"segment {i} was sampled otherwise than segment 0")
        bodies.append(body)
        start = end
    if start != len(token_ids):
        raise ReceiptError(f"the segments cover {start} tokens; the stream has {len(token_ids)}")
    return bodies


def _digest(signed: common_pb2.SignedReceipt) -> bytes:
    return blake3(signed.receipt).digest()


def sign_stream_receipt(
    identity: native.Identity,
    request_id: str,
    segments: Sequence[common_pb2.SignedReceipt],
    token_count: int,
    finish_reason: common_pb2.FinishReason.ValueType,
) -> router_pb2.SignedStreamReceipt:
    """The router's receipt for a whole stream (segments already checked)."""
    body = router_pb2.StreamReceipt(
        version=STREAM_RECEIPT_VERSION,
        request_id=request_id,
        segment_digests=[_digest(s) for s in segments],
        token_count=token_count,
        finish_reason=finish_reason,
        resumptions=len(segments) - 1,
    ).SerializeToString(deterministic=True)
    return router_pb2.SignedStreamReceipt(receipt=body, router_key=identity.public_key, signature=identity.sign(body))


def verify_stream_receipt(
    signed: router_pb2.SignedStreamReceipt, segments: Sequence[common_pb2.SignedReceipt], token_count: int
) -> router_pb2.StreamReceipt:
    """Checks the router's signature and that it names exactly ``segments``, in order, and the
    stream's length and end. Raises :class:`ReceiptError`."""
    try:
        body = router_pb2.StreamReceipt.FromString(signed.receipt)
        native.verify_signature(signed.router_key, signed.receipt, signed.signature)
    except DecodeError as error:
        raise ReceiptError(f"the stream receipt is not a StreamReceipt message: {error}") from None
    except native.CryptoError as error:
        raise ReceiptError(f"the stream receipt's signature is invalid: {error}") from None
    if body.version != STREAM_RECEIPT_VERSION:
        raise ReceiptError(f"stream receipt version {body.version} is not {STREAM_RECEIPT_VERSION}")
    if list(body.segment_digests) != [_digest(s) for s in segments]:
        raise ReceiptError("the stream receipt names other segments than those given")
    if body.token_count != token_count or body.resumptions != len(segments) - 1:
        raise ReceiptError("the stream receipt's length or resumption count is not the stream's")
    try:
        last = common_pb2.Receipt.FromString(segments[-1].receipt)
    except DecodeError as error:
        raise ReceiptError(f"the last segment's receipt is not a Receipt message: {error}") from None
    if body.finish_reason != last.finish_reason:
        raise ReceiptError("the stream receipt's finish reason is not the last segment's")
    return body


def sampling_mismatch(requested: common_pb2.SamplingParams, applied: common_pb2.SamplingParams) -> str:
    """Why a receipt's sampling (``applied``) is not what was asked ("" if it is): a provider
    that claims stop strings, a shorter limit, greedy decoding or another seed than requested
    served something else than was asked, and its check fails. Unset fields leave the node its
    policy (the length limit) or its choice (the seed); "0 or 1" fields mean "off" either way."""

    def off_is_one(value: float) -> float:
        return 1.0 if value in (0.0, 1.0) else value

    problems = []
    if requested.max_new_tokens and applied.max_new_tokens != requested.max_new_tokens:
        problems.append(f"max_new_tokens {applied.max_new_tokens}, asked {requested.max_new_tokens}")
    if not applied.max_new_tokens:
        problems.append("no length limit")
    if applied.temperature != requested.temperature:
        problems.append(f"temperature {applied.temperature:g}, asked {requested.temperature:g}")
    if off_is_one(applied.top_p) != off_is_one(requested.top_p):
        problems.append(f"top_p {applied.top_p:g}, asked {requested.top_p:g}")
    if applied.top_k != requested.top_k:
        problems.append(f"top_k {applied.top_k}, asked {requested.top_k}")
    if off_is_one(applied.repetition_penalty) != off_is_one(requested.repetition_penalty):
        problems.append(f"repetition_penalty {applied.repetition_penalty:g}, asked {requested.repetition_penalty:g}")
    if requested.HasField("seed") and applied.seed != requested.seed:
        problems.append(f"seed {applied.seed}, asked {requested.seed}")
    if not applied.HasField("seed"):
        problems.append("no seed (nobody could replay the sampling)")
    if list(applied.stop) != list(requested.stop):
        problems.append(f"stop strings {list(applied.stop)}, asked {list(requested.stop)}")
    return "; ".join(problems)
