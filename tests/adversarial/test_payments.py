"""Issue 14, attack 5: a provider that declares more prompt tokens than the request can have,
to be paid for them. The router pays each request's bound, which it computes itself before
sending: at most as many prompt tokens as its prompt's bytes allow
(swarmserve.chain.payments.most_prompt_tokens) and the answer's limit, at the published price;
nothing a provider says afterwards changes it. Tried through a real swarm: a provider signing
receipts that claim a million prompt tokens is paid exactly the bound in tokens, nowhere near
the million."""

from __future__ import annotations

import pytest

from services.router.wallet import BATCH
from swarmserve.chain.payments import most_prompt_tokens, price_credits
from swarmserve.client import generate
from swarmserve.receipts import ReceiptWriter
from swarmserve.v1 import common_pb2
from tests.conftest import MODEL, SwarmFactory

PROMPT = "Hi"


async def test_inflated_prompt_tokens_are_not_paid_for(swarm: SwarmFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    honest_sign = ReceiptWriter.sign

    def inflating_sign(
        self: ReceiptWriter, finish_reason: common_pb2.FinishReason.ValueType, timing: common_pb2.Timing
    ) -> common_pb2.SignedReceipt:
        timing.prompt_tokens = 1_000_000
        return honest_sign(self, finish_reason, timing)

    monkeypatch.setattr(ReceiptWriter, "sign", inflating_sign)
    async with swarm(relays=3, ledger=True) as s:
        provider = s.inference[0].keys.identity.public_key
        result = await generate(s.router.address, PROMPT, model=MODEL, max_tokens=8)
        assert result.receipt is not None and result.receipt.timing.prompt_tokens == 1_000_000  # the claim, signed
        signed = s.inference[0].membership.describe()  # the provider's own descriptor, with its price
        published = common_pb2.NodeDescriptor.FromString(signed.descriptor).price
        bound = price_credits(published, most_prompt_tokens(len(PROMPT.encode()), 1), 8)
        spent = s.inference[0].servicer.service.billing.desk.spent()  # type: ignore[union-attr]
        assert spent * published.credits_per_token == bound
        assert spent * published.credits_per_token < price_credits(published, 1_000_000, len(result.token_ids))
        assert s.router.chain.book.issued(provider) == BATCH  # type: ignore[union-attr]  # one batch, no more
