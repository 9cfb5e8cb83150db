"""Issue 14, attack 3: learning who asked. The router used to sign every forwarded request with
its identity key, so every exit learned which router each request came from, and billed it.
Tried at the exit of real swarms (the request it decodes from the circuit is recorded):

- A provider that bills nobody (no ledger) receives requests that carry no caller key, no
  signature, no token, and no byte of the router's key.
- A provider that bills (ledger, default price) receives payment tokens and, again, nothing of
  the router: the tokens were bought by the router with a cheque (which names it), blinded, so
  the provider cannot tell which purchase a redeemed token came from. Its receipts and the
  router's cheques still settle on the chain.
- Riding for free: a request with no tokens, with too few, with forged ones, or with tokens
  already spent (replayed from an earlier request) is refused with PERMISSION_DENIED.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

import services.inference.exit as exit_module
from services.relay.client import OpenCircuit
from swarmserve import native
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


async def test_an_exit_that_bills_is_paid_in_tokens_that_name_nobody(
    swarm: SwarmFactory, seen_at_exit: list[inference_pb2.InferenceGenerateRequest]
) -> None:
    async with swarm(relays=1, ledger=True) as s:
        exit_ = s.router.directory.alive(common_pb2.NODE_ROLE_INFERENCE)[0]
        provider = s.inference[0]
        router_key = s.router.keys.identity.public_key
        assert len(exit_.descriptor.token_key) == 32 and not exit_.descriptor.policy.requires_caller
        await generate(s.router.address, "Who am I?", model=MODEL, hops=1, max_tokens=4)
        paid = seen_at_exit[-1]
        assert paid.caller_key == b"" and paid.caller_signature == b"" and len(paid.tokens) >= 1
        assert router_key not in paid.SerializeToString()
        # The purchase is the only place the router showed itself: a cheque, owed by it.
        assert provider.chain is not None and s.router.chain is not None
        bought = s.router.chain.book.issued(provider.keys.identity.public_key)
        assert bought >= len(paid.tokens) and provider.chain.inbox.unpaid(router_key) == 0

        async def attempt(tokens: list[inference_pb2.PaymentToken]) -> relay_pb2.CircuitMessage:
            circuit = await OpenCircuit.open(s.router.channels, [], exit_, setup_timeout_s=5, cell_timeout_s=30)
            request = inference_pb2.InferenceGenerateRequest(
                request_id="free-ride",
                model=MODEL,
                prompt="Who am I?",
                sampling=common_pb2.SamplingParams(max_new_tokens=4),
            )
            request.tokens.extend(tokens)
            await circuit.send(relay_pb2.CircuitMessage(request=request))
            answer = await circuit.receive()
            circuit.close()
            return answer

        forged = inference_pb2.PaymentToken(nonce=bytes(32), output=bytes(64))
        for tokens, reason in (
            ([], "needs"),
            ([forged], "not one of this node's"),
            (list(paid.tokens), "already spent"),  # replayed from the request above
        ):
            answer = await attempt(tokens)
            assert answer.WhichOneof("body") == "error", reason
            assert answer.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            assert reason in answer.error.message
        # The control: fresh tokens from the router's wallet are taken.
        assert s.router.service.wallet is not None
        fresh = await s.router.service.wallet.take(exit_, len(paid.tokens))
        assert (await attempt(fresh)).WhichOneof("body") == "response"


async def test_tokens_evaluated_under_another_key_than_the_published_one_are_refused(swarm: SwarmFactory) -> None:
    """A provider that would mark one buyer (evaluating its purchase under a key kept for it, so
    that its tokens are recognisable when redeemed) is caught by the proof: the router refuses the
    tokens (DATA_LOSS) and sends the request nowhere with them."""
    async with swarm(relays=1, ledger=True) as s:
        desk = s.inference[0].servicer.service.billing.desk  # type: ignore[union-attr]
        marking = native.TokenIssuer(b"m" * 32)
        desk.issue = marking.issue  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate(s.router.address, "Who am I?", model=MODEL, hops=1, max_tokens=4)
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS
        assert "published key" in (refused.value.details() or "")
        assert desk.spent() == 0
