"""Issue 14, attack 2 (in part): a provider that claims other sampling than was asked (stop
strings, a shorter limit, greedy for sampled, another seed, no seed) so that its stream passes a
check against what it claims. Routers and clients compare every receipt's sampling with the
request (swarmserve.receipts.sampling_mismatch); a mismatch is a failed stream: the router
neither co-signs nor pays it. Tried: the comparison on what an honest node writes and on each lying
claim; and a real swarm whose provider claims a stop string nobody asked for: the client gets
DATA_LOSS naming it, and the router owes the provider nothing."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

import services.inference.service as inference_service
from swarmserve.client import generate
from swarmserve.receipts import sampling_mismatch
from swarmserve.v1 import common_pb2
from tests.conftest import MODEL, SwarmFactory


def asked(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)  # type: ignore[arg-type]


def test_honest_receipts_match_what_was_asked() -> None:
    # The node fills its policy's limit and its own seed where the request left them open, and
    # writes "off" as 1.0.
    assert sampling_mismatch(asked(), asked(max_new_tokens=128, top_p=1.0, repetition_penalty=1.0, seed=7)) == ""
    request = asked(max_new_tokens=40, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=["\n\n"])
    assert sampling_mismatch(request, request) == ""


def test_every_lie_about_sampling_is_named() -> None:
    request = asked(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=11)
    lies = {
        "max_new_tokens": asked(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=11),
        "temperature": asked(max_new_tokens=64, temperature=0.0, top_p=0.9, seed=11),  # greedy served
        "top_p": asked(max_new_tokens=64, temperature=0.7, top_p=0.5, seed=11),
        "top_k": asked(max_new_tokens=64, temperature=0.7, top_p=0.9, top_k=1, seed=11),
        "repetition_penalty": asked(max_new_tokens=64, temperature=0.7, top_p=0.9, repetition_penalty=2.0, seed=11),
        "seed 12": asked(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=12),
        "no seed": asked(max_new_tokens=64, temperature=0.7, top_p=0.9),
        "stop strings": asked(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=11, stop=["."]),
        "no length limit": asked(temperature=0.7, top_p=0.9, seed=11),
    }
    for named, claimed in lies.items():
        assert named in sampling_mismatch(request, claimed), named


async def test_a_provider_claiming_other_sampling_is_neither_co_signed_nor_paid(
    swarm: SwarmFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with swarm(relays=3, ledger=True) as s:
        provider = s.inference[0].keys.identity.public_key
        book = s.router.chain.book  # type: ignore[union-attr]
        await generate(s.router.address, "Hi", model=MODEL, max_tokens=8)  # the control: honest, paid
        paid = book.issued(provider)
        assert paid > 0
        honest = inference_service._sampling_message

        def claims_a_stop_string(sampling: object) -> common_pb2.SamplingParams:
            message = honest(sampling)  # type: ignore[arg-type]
            message.stop.append(".")  # would excuse ending the stream early
            return message

        monkeypatch.setattr(inference_service, "_sampling_message", claims_a_stop_string)
        with pytest.raises(aio.AioRpcError) as refused:
            await generate(s.router.address, "Hi", model=MODEL, max_tokens=8)
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS
        assert "did not sample as asked" in (refused.value.details() or "")
        assert "stop strings" in (refused.value.details() or "")
        assert book.issued(provider) == paid
