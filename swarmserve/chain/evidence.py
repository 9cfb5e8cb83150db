"""What the chain checks of a verdict's evidence before recording it: that the receipt is the
provider's, that a party other than the provider paid for and co-signed it, and, for a FAIL,
that the prompt and tokens are exactly those the receipt commits to, so that an appeal
committee can re-execute them. The chain cannot run the model; it makes sure that whoever does
runs it on the stream the provider signed."""

from __future__ import annotations

from dataclasses import dataclass

from blake3 import blake3
from google.protobuf.message import DecodeError

from swarmserve import native
from swarmserve.receipts import ReceiptError, prompt_digest, verify_receipt
from swarmserve.v1 import chain_pb2, common_pb2

__all__ = ["EvidenceError", "ReceiptFacts", "check_evidence", "verdict_id"]


class EvidenceError(ValueError):
    """Evidence that does not support a verdict."""


@dataclass(frozen=True)
class ReceiptFacts:
    receipt: common_pb2.Receipt
    cosigners: tuple[bytes, ...]  # keys whose co-signature over the receipt is valid


def verdict_id(signed_receipt: common_pb2.SignedReceipt) -> bytes:
    """A verdict's id: the receipt body's digest (one verdict per served stream)."""
    return blake3(b"swarmserve-verdict-v1" + signed_receipt.receipt).digest()


def check_evidence(evidence: chain_pb2.VerdictEvidence, *, with_stream: bool) -> ReceiptFacts:
    """The receipt's body and valid co-signers; with ``with_stream``, also checks that the
    tokens and prompt are those the receipt commits to. Raises :class:`EvidenceError`."""
    signed = evidence.receipt
    try:
        if with_stream:
            receipt = verify_receipt(signed, list(evidence.token_ids), list(evidence.token_texts))
            if prompt_digest(list(evidence.prompt_token_ids)) != receipt.prompt_digest:
                raise EvidenceError("the prompt token ids are not the ones the receipt commits to")
            prefix = list(evidence.prefix_token_ids)
            if receipt.prefix_tokens != len(prefix) or (prefix and prompt_digest(prefix) != receipt.prefix_digest):
                raise EvidenceError("the prefix token ids are not the ones the receipt's segment continued from")
        else:
            receipt = common_pb2.Receipt.FromString(signed.receipt)
            native.verify_signature(receipt.node_key, signed.receipt, signed.signature)
    except (ReceiptError, DecodeError, native.CryptoError) as error:
        raise EvidenceError(f"the receipt does not check out: {error}") from error
    cosigners: list[bytes] = []
    for cosignature in signed.cosignatures:
        try:
            native.verify_signature(cosignature.signer_key, signed.receipt, cosignature.signature)
        except native.CryptoError:
            continue
        cosigners.append(cosignature.signer_key)
    return ReceiptFacts(receipt, tuple(cosigners))
