"""A small client for ``Router.Generate``: streams the text as it arrives, then checks the
receipts itself: every segment signed by the node that served it and co-signed by the router,
the segments together committing to exactly the tokens received (a stream resumed after a
failure has several), and the router's stream receipt naming them all."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from grpc import aio

from swarmserve import native
from swarmserve.receipts import ReceiptError, sampling_mismatch, verify_segments, verify_stream_receipt
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc

__all__ = ["GenerationResult", "ReceiptError", "check_openai_receipt", "check_receipt", "check_summary", "generate"]


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_texts: list[bytes] = field(default_factory=list)
    summary: router_pb2.GenerateSummary | None = None
    receipt: common_pb2.Receipt | None = None  # the last segment's
    segments: list[common_pb2.Receipt] = field(default_factory=list)  # all, in order (one unless resumed)
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        decode = self.total_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else 0.0


async def generate(
    router: str,
    prompt: str,
    *,
    model: str,
    hops: int | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    raw: bool = False,
    allow_audit: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Streams one generation (``prompt`` as a user's chat turn, or as raw text to complete
    with ``raw``); raises ``grpc.aio.AioRpcError`` on refusal and ReceiptError if
    the receipt does not check out."""
    sampling = common_pb2.SamplingParams(max_new_tokens=max_tokens, temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    request = router_pb2.GenerateRequest(model=model, sampling=sampling)
    if raw:  # complete the text as is
        request.prompt = prompt
    else:  # a user turn, in the model's chat template
        request.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=prompt)
    if hops is not None:
        request.privacy.hops = hops
    request.privacy.allow_audit = allow_audit  # see PrivacyOptions in router.proto
    result = GenerationResult()
    started = time.monotonic()
    async with aio.insecure_channel(router) as channel:
        async for reply in router_pb2_grpc.RouterStub(channel).Generate(request):
            if reply.HasField("token"):
                chunk = reply.token
                if chunk.token_ids and not result.token_ids:
                    result.time_to_first_token_s = time.monotonic() - started
                result.token_ids.extend(chunk.token_ids)
                result.token_texts.extend(chunk.token_texts)
                result.text += chunk.text
                if on_text is not None and chunk.text:
                    on_text(chunk.text)
            else:
                result.summary = reply.summary
    result.total_s = time.monotonic() - started
    if result.summary is None:
        raise ReceiptError("the stream ended without a summary")
    result.segments = check_summary(result.summary, result.token_ids, result.token_texts, sampling)
    result.receipt = result.segments[-1]
    return result


def check_summary(
    summary: router_pb2.GenerateSummary,
    token_ids: Sequence[int],
    token_texts: Sequence[bytes],
    asked: common_pb2.SamplingParams | None = None,
) -> list[common_pb2.Receipt]:
    """Every segment's receipt body, once the whole stream is checked (see
    :func:`check_receipt`): the segments, in order, cover exactly these tokens, each co-signed by
    the router whose stream receipt names them all. Raises :class:`ReceiptError`."""
    return check_receipt(
        summary.receipt,
        summary.served_by,
        token_ids,
        token_texts,
        asked,
        earlier_segments=summary.earlier_segments,
        stream_receipt=summary.stream_receipt if summary.HasField("stream_receipt") else None,
    )


def check_receipt(
    signed: common_pb2.SignedReceipt,
    served_by: str,
    token_ids: Sequence[int],
    token_texts: Sequence[bytes],
    asked: common_pb2.SamplingParams | None = None,
    *,
    earlier_segments: Sequence[common_pb2.SignedReceipt] = (),
    stream_receipt: router_pb2.SignedStreamReceipt | None = None,
) -> list[common_pb2.Receipt]:
    """The bodies of the stream's segment receipts (``earlier_segments`` then ``signed``, the
    last), once checked: each signed by the node that served it, the last by ``served_by`` (the
    node the router named); together committing to exactly these tokens; each co-signed by the
    router; given what was ``asked``, sampled as asked; and, given the router's
    ``stream_receipt``, named by it in order, signed by a key that co-signed every segment.
    Raises :class:`ReceiptError`."""
    segments = [*earlier_segments, signed]
    receipts = verify_segments(segments, token_ids, token_texts)
    if asked is not None:
        mismatch = sampling_mismatch(asked, receipts[-1].sampling)
        if mismatch:
            raise ReceiptError(f"the serving node did not sample as asked: {mismatch}")
    if native.node_id(receipts[-1].node_key) != served_by:
        raise ReceiptError("the receipt is signed by another node than the one the router named")
    cosigners: set[bytes] | None = None
    for i, segment in enumerate(segments):
        if not segment.cosignatures:
            raise ReceiptError(f"the router did not co-sign segment {i}")
        for cosignature in segment.cosignatures:
            try:
                native.verify_signature(cosignature.signer_key, segment.receipt, cosignature.signature)
            except native.CryptoError as error:
                raise ReceiptError(f"a co-signature of segment {i} does not verify: {error}") from None
        keys = {c.signer_key for c in segment.cosignatures}
        cosigners = keys if cosigners is None else cosigners & keys
    if stream_receipt is not None:
        verify_stream_receipt(stream_receipt, segments, len(token_ids))
        if stream_receipt.router_key not in (cosigners or set()):
            raise ReceiptError("the stream receipt is signed by a key that did not co-sign every segment")
    elif earlier_segments:
        raise ReceiptError("a resumed stream comes with the router's stream receipt")
    return receipts


def check_openai_receipt(swarmserve: Mapping[str, Any], text: str | None = None) -> common_pb2.Receipt:
    """Checks the ``swarmserve`` object of an answer from the router's OpenAI-compatible API
    (``response.model_extra["swarmserve"]`` with the ``openai`` SDK, or the final chunk's) as
    :func:`check_receipt` does, and, given the answer's ``text``, that the tokens spell it.
    Raises :class:`ReceiptError`."""

    def decoded(value: Any) -> bytes:
        return base64.b64decode(value, validate=True)

    try:
        signed = common_pb2.SignedReceipt.FromString(decoded(swarmserve["receipt"]))
        earlier = [common_pb2.SignedReceipt.FromString(decoded(s)) for s in swarmserve.get("earlier_segments", [])]
        stream = swarmserve.get("stream_receipt")
        stream_receipt = router_pb2.SignedStreamReceipt.FromString(decoded(stream)) if stream else None
        token_texts = [decoded(t) for t in swarmserve["token_texts"]]
        token_ids = [int(t) for t in swarmserve["token_ids"]]
        served_by = str(swarmserve["served_by"])
    except (KeyError, TypeError, ValueError, DecodeError) as error:
        raise ReceiptError(f"the swarmserve object is malformed: {error}") from None
    receipts = check_receipt(
        signed, served_by, token_ids, token_texts, earlier_segments=earlier, stream_receipt=stream_receipt
    )
    if text is not None and b"".join(token_texts).decode("utf-8", errors="replace") != text:
        raise ReceiptError("the answer's text is not what the receipt's tokens spell")
    return receipts[-1]
