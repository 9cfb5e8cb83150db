"""Signed receipts over served token streams: written by inference nodes, checked by routers and
verifiers. A receipt commits (native BLAKE3 hash chain) to exactly the tokens sent, with the
request id, model digest, prompt digest and sampling parameters (seed included), and is signed
with the node's Ed25519 identity. Anyone with the node's public key and the tokens can check it.
"""

from __future__ import annotations

from collections.abc import Sequence

from blake3 import blake3
from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.v1 import common_pb2

__all__ = [
    "RECEIPT_VERSION",
    "ReceiptError",
    "ReceiptWriter",
    "prompt_digest",
    "sampling_bytes",
    "sampling_mismatch",
    "verify_receipt",
]

RECEIPT_VERSION = 1


class ReceiptError(Exception):
    """A receipt that does not check out; the message says which check failed."""


def prompt_digest(prompt_ids: Sequence[int]) -> bytes:
    """BLAKE3 of the prompt token ids, each as a little-endian u32."""
    return blake3(b"".join(token.to_bytes(4, "little") for token in prompt_ids)).digest()


def sampling_bytes(sampling: common_pb2.SamplingParams) -> bytes:
    """The bytes of the sampling parameters that the hash chain's header commits to."""
    return sampling.SerializeToString(deterministic=True)


class ReceiptWriter:
    """Feeds every token sent into the hash chain, then signs the receipt."""

    def __init__(
        self,
        identity: native.Identity,
        request_id: str,
        model_digest: bytes,
        prompt_ids: Sequence[int],
        sampling: common_pb2.SamplingParams,
    ) -> None:
        self._identity = identity
        self._receipt = common_pb2.Receipt(
            version=RECEIPT_VERSION,
            request_id=request_id,
            node_key=identity.public_key,
            model_digest=model_digest,
            prompt_digest=prompt_digest(prompt_ids),
            sampling=sampling,
        )
        self._chain = native.TokenStreamHasher(
            request_id.encode(), model_digest, self._receipt.prompt_digest, sampling_bytes(sampling)
        )

    def add(self, token_id: int, text: bytes) -> None:
        self._chain.update(token_id, text)

    def sign(
        self, finish_reason: common_pb2.FinishReason.ValueType, timing: common_pb2.Timing
    ) -> common_pb2.SignedReceipt:
        receipt = common_pb2.Receipt()
        receipt.CopyFrom(self._receipt)
        receipt.token_count = self._chain.count
        receipt.commitment = self._chain.commitment()
        receipt.finish_reason = finish_reason
        receipt.timing.CopyFrom(timing)
        body = receipt.SerializeToString(deterministic=True)
        return common_pb2.SignedReceipt(receipt=body, signature=self._identity.sign(body))


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
        expected = native.token_stream_commitment(
            receipt.request_id.encode(),
            receipt.model_digest,
            receipt.prompt_digest,
            sampling_bytes(receipt.sampling),
            list(token_ids),
            list(texts),
        )
    except ValueError as error:
        raise ReceiptError(f"receipt header is malformed: {error}") from None
    if expected != receipt.commitment:
        raise ReceiptError("receipt commitment does not match the tokens received")
    return receipt


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
