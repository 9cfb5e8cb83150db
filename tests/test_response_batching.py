"""Several tokens per message at the exit under backlog (services/inference/exit.py): while the
caller takes each message as it is ready, every token leaves alone and at once; when it falls
behind, the tokens generated meanwhile leave together in one ``ResponseBatch``, in order, and the
router reads them back into the same stream, whose receipt still verifies. Tried broken: a
packer that took only one response per message (the slow caller got no batch), one that dropped
the batch before an error (the tokens before it were lost), and a router that read only
``response`` bodies (the batched stream failed with DATA_LOSS)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.inference.config import ProviderPolicy
from services.inference.emulated import EmulatedEngine
from services.inference.exit import MAX_BATCHED_RESPONSES, InferenceExit, batched_responses
from services.inference.service import InferenceService
from services.router.service import _responses
from swarmserve import native
from swarmserve.receipts import verify_receipt
from swarmserve.rpc import DataLoss, ServiceError
from swarmserve.v1 import common_pb2, inference_pb2, relay_pb2


def token(index: int) -> inference_pb2.InferenceGenerateResponse:
    return inference_pb2.InferenceGenerateResponse(token=inference_pb2.InferenceToken(token_id=index, index=index))


async def produced(
    count: int, gap_s: float, error: Exception | None = None
) -> AsyncIterator[inference_pb2.InferenceGenerateResponse]:
    for index in range(count):
        await asyncio.sleep(gap_s)
        yield token(index)
    if error is not None:
        raise error


async def test_a_caller_that_keeps_up_gets_every_token_alone() -> None:
    batches = [batch async for batch in batched_responses(produced(20, 0.002))]
    assert [len(batch) for batch in batches] == [1] * 20


async def test_a_caller_that_falls_behind_gets_the_tokens_made_meanwhile_together_in_order() -> None:
    batches = []
    async for batch in batched_responses(produced(300, 0)):
        batches.append(batch)
        await asyncio.sleep(0.05)  # a backlogged circuit
    assert [r.token.index for batch in batches for r in batch] == list(range(300))
    assert len(batches[0]) == 1, "the first token did not wait"
    assert max(len(batch) for batch in batches) == MAX_BATCHED_RESPONSES
    assert len(batches) < 10


async def test_an_error_comes_after_the_tokens_before_it() -> None:
    received: list[int] = []
    with pytest.raises(ServiceError, match="node failed"):
        async for batch in batched_responses(produced(5, 0, ServiceError("node failed"))):
            received.extend(r.token.index for r in batch)
            await asyncio.sleep(0.01)
    assert received == list(range(5))


async def test_a_backlogged_exit_sends_batches_the_router_reads_back_into_a_verified_stream() -> None:
    identity = native.Identity.generate()
    engine = EmulatedEngine("emu", decode_us_per_token=0, prefill_us_per_token=0)
    exit_ = InferenceExit(lambda: InferenceService(identity, {"emu": engine}, ProviderPolicy()))
    request = inference_pb2.InferenceGenerateRequest(
        model="emu", prompt="a b c", sampling=common_pb2.SamplingParams(max_new_tokens=40)
    )

    async def forward() -> AsyncIterator[bytes]:
        yield relay_pb2.CircuitMessage(request=request).SerializeToString()
        await asyncio.Event().wait()  # the circuit stays open

    messages = []
    async for plaintext in exit_.handle(forward()):
        messages.append(relay_pb2.CircuitMessage.FromString(plaintext))
        await asyncio.sleep(0.02)  # the caller (the circuit) is slow
        if (_responses(messages[-1])[-1]).HasField("summary"):
            break
    assert any(m.WhichOneof("body") == "responses" for m in messages), "several tokens rode together"
    events = [event for message in messages for event in _responses(message)]
    tokens = [event.token for event in events[:-1]]
    assert [t.index for t in tokens] == list(range(40))
    verify_receipt(
        events[-1].summary.receipt, [t.token_id for t in tokens], [t.text for t in tokens], node_key=identity.public_key
    )


def test_the_router_refuses_a_batch_of_fewer_than_two_and_other_bodies() -> None:
    one = relay_pb2.CircuitMessage(responses=relay_pb2.ResponseBatch(responses=[token(0)]))
    with pytest.raises(DataLoss):
        _responses(one)
    with pytest.raises(DataLoss):
        _responses(relay_pb2.CircuitMessage(request=inference_pb2.InferenceGenerateRequest()))
    error = relay_pb2.CircuitMessage(error=relay_pb2.CircuitError(code=8, message="busy"))
    with pytest.raises(ServiceError, match="busy"):
        _responses(error)
