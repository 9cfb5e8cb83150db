"""Issue 14, attack 3 (in part): learning who asked. The router used to sign every forwarded
request with its identity key, so every exit learned which router each request came from.
Tried at the exit of real swarms (the request it decodes from the circuit is recorded):

- A provider that bills nobody (no ledger, or a zero price) publishes ``requires_caller: false``
  and receives requests that carry no caller key, no signature, and no byte of the router's key.
- The control: a provider that bills its callers (ledger, default price) receives the router's
  signed request, as its policy says.
- A caller that leaves its identity off a request to a billing provider is refused
  (PERMISSION_DENIED), so anonymity cannot be used to ride for free.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

import services.inference.exit as exit_module
from services.relay.client import OpenCircuit
from swarmserve.client import generate
from swarmserve.v1 import common_pb2, inference_pb2, relay_pb2
from tests.conftest import MODEL, SwarmFactory


@pytest.fixture
def seen_at_exit(monkeypatch: pytest.MonkeyPatch) -> list[inference_pb2.InferenceGenerateRequest]:
    seen: list[inference_pb2.InferenceGenerateRequest] = []
    decode = exit_module.to_generate_request

    def recording(message: inference_pb2.InferenceGenerateRequest) -> Any:
        copy = inference_pb2.InferenceGenerateRequest()
        copy.CopyFrom(message)
        seen.append(copy)
        return decode(message)

    monkeypatch.setattr(exit_module, "to_generate_request", recording)
    return seen


async def test_an_exit_that_bills_nobody_learns_no_caller(
    swarm: SwarmFactory, seen_at_exit: list[inference_pb2.InferenceGenerateRequest]
) -> None:
    async with swarm(relays=1) as s:
        exit_ = s.router.directory.alive(common_pb2.NODE_ROLE_INFERENCE)[0]
        assert not exit_.descriptor.policy.requires_caller
        result = await generate(s.router.address, "Who am I?", model=MODEL, hops=1, max_tokens=4)
        assert result.token_ids
        assert len(seen_at_exit) == 1
        request = seen_at_exit[0]
        assert request.caller_key == b"" and request.caller_signature == b""
        assert s.router.keys.identity.public_key not in request.SerializeToString()
        # Nor anything that tells one request's source from another's: a fresh random id, a seed.
        assert len(request.request_id) == 32 and request.sampling.HasField("seed")


async def test_an_exit_that_bills_gets_a_signed_request_and_refuses_an_unsigned_one(
    swarm: SwarmFactory, seen_at_exit: list[inference_pb2.InferenceGenerateRequest]
) -> None:
    async with swarm(relays=1, ledger=True) as s:
        exit_ = s.router.directory.alive(common_pb2.NODE_ROLE_INFERENCE)[0]
        assert exit_.descriptor.policy.requires_caller
        await generate(s.router.address, "Who am I?", model=MODEL, hops=1, max_tokens=4)
        assert seen_at_exit[-1].caller_key == s.router.keys.identity.public_key
        # A free rider: the same request with no caller, straight to the exit.
        circuit = await OpenCircuit.open(s.router.channels, [], exit_, setup_timeout_s=5, cell_timeout_s=30)
        unsigned = inference_pb2.InferenceGenerateRequest(
            request_id="free-ride",
            model=MODEL,
            prompt="Who am I?",
            sampling=common_pb2.SamplingParams(max_new_tokens=4),
        )
        await circuit.send(relay_pb2.CircuitMessage(request=unsigned))
        answer = await circuit.receive()
        circuit.close()
        assert answer.WhichOneof("body") == "error"
        assert answer.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "signed by the caller that pays" in answer.error.message
