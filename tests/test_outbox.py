"""The outbox (``swarmserve/chain/outbox.py``): a node's transactions held and sent again until
the chain consumes their nonces, against the real state machine (blocks built by ``chainkit``).

Tried: nonces 2 and 3 finalized before nonce 1 (as when they went through different validators):
void, and without the outbox lost for good; with it, sent again and applied once 1 is in. A
consumed transaction is never sent again; one not yet due is not resent early; a full outbox
refuses to sign; a failed transaction (unaffordable) consumes its nonce and leaves too."""

from __future__ import annotations

import pytest

from swarmserve.chain import ChainState
from swarmserve.chain.outbox import Outbox
from swarmserve.rpc import ResourceExhausted
from swarmserve.v1 import chain_pb2
from tests.chainkit import Chain
from tests.test_chain_state import ALICE, BOB, CAROL, GENESIS


def pay(credits: int) -> chain_pb2.TransferCredits:
    return chain_pb2.TransferCredits(recipient_key=CAROL.public_key, credits=credits)


def nonce(state: ChainState) -> int:
    return state.account(ALICE.public_key).nonce


def test_transactions_finalized_out_of_order_are_sent_again_and_apply() -> None:
    chain = Chain(GENESIS, 1)
    outbox = Outbox(ALICE, chain.chain_id, resend_after_s=1.0)
    first, second, third = (outbox.sign(nonce(chain.state), 0.0, transfer=pay(credits)) for credits in (1, 2, 3))
    # The proposer saw 2 and 3 before 1: both void (the nonce is not the account's next).
    chain.block([second, third])
    assert nonce(chain.state) == 0 and chain.state.account(CAROL.public_key).available == 0
    chain.block([first])
    assert nonce(chain.state) == 1
    # Not due before resend_after_s; then 2 and 3 again, in nonce order, never the consumed 1.
    assert outbox.due(nonce(chain.state), now=0.5) == []
    assert outbox.due(nonce(chain.state), now=1.0) == [second, third]
    chain.block([second, third])
    assert nonce(chain.state) == 3
    assert chain.state.account(CAROL.public_key).available == 1 + 2 + 3
    assert outbox.due(nonce(chain.state), now=10.0) == [] and len(outbox) == 0


def test_nonces_continue_above_the_held_ones_and_a_failed_transaction_leaves() -> None:
    chain = Chain(GENESIS, 1)
    outbox = Outbox(BOB, chain.chain_id)  # BOB holds 10 credits
    applied = chain.state.account(BOB.public_key).nonce
    too_much = outbox.sign(applied, 0.0, transfer=pay(1000))
    after = outbox.sign(applied, 0.0, transfer=pay(4))
    chain.block([too_much, after])  # the first fails for want of credits, but spends its nonce
    applied = chain.state.account(BOB.public_key).nonce
    assert applied == 2 and chain.state.account(CAROL.public_key).available == 4
    assert outbox.due(applied, now=100.0) == [] and len(outbox) == 0
    # A node that signs while older ones are held takes the nonce after them, not the chain's next.
    chain_next = Outbox(BOB, chain.chain_id)
    held = [chain_next.sign(applied, 0.0, transfer=pay(1)) for _ in range(2)]
    chain.block(list(reversed(held)))  # out of order: 4 void, 3 applies
    assert chain.state.account(BOB.public_key).nonce == 3
    chain.block(chain_next.due(chain.state.account(BOB.public_key).nonce, now=1.0))
    assert chain.state.account(BOB.public_key).nonce == 4


def test_a_full_outbox_refuses_to_sign() -> None:
    outbox = Outbox(ALICE, b"\x01" * 32, capacity=2)
    outbox.sign(0, 0.0, transfer=pay(1))
    outbox.sign(0, 0.0, transfer=pay(1))
    with pytest.raises(ResourceExhausted, match="wait for the chain"):
        outbox.sign(0, 0.0, transfer=pay(1))
    outbox.sign(1, 0.0, transfer=pay(1))  # one consumed: room again
