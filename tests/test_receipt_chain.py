"""Chained receipts alone (``swarmserve/receipts``): a stream served in two segments, the first
cut after its node's last checkpoint, and every way tried of passing off a chain that is not
the stream: a checkpoint over fewer tokens, a segment continuing from other tokens or after the
wrong count, another seed, a cut segment that claims the end, a last segment that does not, a
header that already names tokens, and a stream receipt naming other segments or signed by
somebody else."""

from __future__ import annotations

import pytest

from swarmserve import native
from swarmserve.receipts import (
    ReceiptError,
    ReceiptWriter,
    checkpoint_receipt,
    sign_stream_receipt,
    verify_segments,
    verify_stream_receipt,
)
from swarmserve.v1 import common_pb2

PROMPT = [1, 2, 3]
IDS = list(range(100, 112))
TEXTS = [f"t{i} ".encode() for i in range(len(IDS))]
CUT = 5
SAMPLING = common_pb2.SamplingParams(max_new_tokens=len(IDS), temperature=0.7, seed=42)
FIRST, SECOND, ROUTER = native.Identity.generate(), native.Identity.generate(), native.Identity.generate()


def writer(
    identity: native.Identity, prefix: list[int], sampling: common_pb2.SamplingParams = SAMPLING
) -> ReceiptWriter:
    return ReceiptWriter(identity, f"req-{len(prefix)}", b"\x07" * 32, PROMPT, sampling, prefix)


def cut_segment(tokens: int = CUT) -> tuple[common_pb2.SignedReceipt, list[bytes]]:
    """The first node's segment cut after ``tokens``: its receipt, and every checkpoint it sent."""
    first = writer(FIRST, [])
    checkpoints = [first.add(token, text) for token, text in zip(IDS[:tokens], TEXTS[:tokens], strict=True)]
    return checkpoint_receipt(first.header(), checkpoints[-1], IDS[:tokens], TEXTS[:tokens]), checkpoints


def last_segment(
    prefix: list[int] = IDS[:CUT], sampling: common_pb2.SamplingParams = SAMPLING, identity: native.Identity = SECOND
) -> common_pb2.SignedReceipt:
    second = writer(identity, prefix, sampling)
    for token, text in zip(IDS[len(prefix) :], TEXTS[len(prefix) :], strict=True):
        second.add(token, text)
    return second.sign(common_pb2.FINISH_REASON_LENGTH, common_pb2.Timing())


def test_a_stream_in_two_segments_checks_and_each_segment_names_its_node() -> None:
    cut, _ = cut_segment()
    bodies = verify_segments([cut, last_segment()], IDS, TEXTS)
    assert [b.node_key for b in bodies] == [FIRST.public_key, SECOND.public_key]
    assert [(b.prefix_tokens, b.token_count) for b in bodies] == [(0, CUT), (CUT, len(IDS) - CUT)]
    assert bodies[0].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    stream = sign_stream_receipt(ROUTER, "client-1", [cut, last_segment()], len(IDS), common_pb2.FINISH_REASON_LENGTH)
    assert verify_stream_receipt(stream, [cut, last_segment()], len(IDS)).resumptions == 1


def test_a_checkpoint_covers_exactly_the_tokens_it_was_signed_after() -> None:
    _, checkpoints = cut_segment()
    first = writer(FIRST, [])
    with pytest.raises(ReceiptError, match="signature is invalid"):  # an earlier checkpoint for all five
        checkpoint_receipt(first.header(), checkpoints[2], IDS[:CUT], TEXTS[:CUT])
    with pytest.raises(ReceiptError, match="signature is invalid"):  # a token changed under the checkpoint
        checkpoint_receipt(first.header(), checkpoints[-1], [*IDS[: CUT - 1], 7], TEXTS[:CUT])
    with pytest.raises(ReceiptError, match="malformed"):
        checkpoint_receipt(b"\xff\xff", checkpoints[-1], IDS[:CUT], TEXTS[:CUT])
    named = common_pb2.Receipt.FromString(first.header())
    named.token_count = CUT
    with pytest.raises(ReceiptError, match="already names tokens"):
        checkpoint_receipt(named.SerializeToString(), checkpoints[-1], IDS[:CUT], TEXTS[:CUT])


@pytest.mark.parametrize(
    ("segments", "reason"),
    [
        (lambda cut: [last_segment()], "continues after 5 tokens, not after 0"),
        (lambda cut: [last_segment(), cut], "continues after 5 tokens, not after 0"),
        (lambda cut: [cut, last_segment(prefix=[*IDS[: CUT - 1], 9])], "continues from other tokens"),
        (lambda cut: [cut, last_segment(prefix=IDS[: CUT - 1])], "continues after 4 tokens, not after 5"),
        (
            lambda cut: [cut, last_segment(sampling=common_pb2.SamplingParams(max_new_tokens=len(IDS), seed=43))],
            "sampled otherwise",
        ),
        (lambda cut: [cut], "checkpoint: the stream did not end"),
        (lambda cut: [last_segment(prefix=[]), last_segment()], "not a cut segment"),
        (lambda cut: [], "at least one segment"),
    ],
    ids=[
        "first-dropped",
        "reordered",
        "other-prefix",
        "wrong-prefix-count",
        "other-seed",
        "unfinished",
        "two-ends",
        "none",
    ],
)
def test_a_chain_that_is_not_the_stream_is_refused(segments, reason: str) -> None:  # type: ignore[no-untyped-def]
    cut, _ = cut_segment()
    chain = segments(cut)
    ids, texts = IDS, TEXTS
    if len(chain) == 1 and chain[0] is cut:
        ids, texts = IDS[:CUT], TEXTS[:CUT]
    with pytest.raises(ReceiptError, match=reason):
        verify_segments(chain, ids, texts)


def test_a_stream_receipt_names_exactly_the_segments_in_order() -> None:
    cut, _ = cut_segment()
    last = last_segment()
    stream = sign_stream_receipt(ROUTER, "client-1", [cut, last], len(IDS), common_pb2.FINISH_REASON_LENGTH)
    with pytest.raises(ReceiptError, match="names other segments"):
        verify_stream_receipt(stream, [last, cut], len(IDS))
    with pytest.raises(ReceiptError, match="length or resumption"):
        verify_stream_receipt(stream, [cut, last], len(IDS) - 1)
    forged = type(stream)()
    forged.CopyFrom(stream)
    forged.router_key = FIRST.public_key
    with pytest.raises(ReceiptError, match="signature is invalid"):
        verify_stream_receipt(forged, [cut, last], len(IDS))
    wrong_end = sign_stream_receipt(ROUTER, "client-1", [cut, last], len(IDS), common_pb2.FINISH_REASON_STOP)
    with pytest.raises(ReceiptError, match="finish reason"):
        verify_stream_receipt(wrong_end, [cut, last], len(IDS))
