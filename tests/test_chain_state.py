"""The ledger's state machine alone (swarmserve/chain/state.py), on blocks built here and applied
to several replicas: credits only from genesis (a fresh key holds nothing), transfers, the
double spend (two transfers of a whole balance, with one nonce or with two: exactly one
applies, identically everywhere), replays, void transactions (forged, another chain's,
malformed) that change nothing, bonding and unbonding with its release height, forks and
out-of-order blocks refused, durability across reopening, and equal state roots on every
replica for random streams of transfers, bonds, cheques and memberships (hypothesis), with credits
conserved, and a transaction that raises cannot stop the chain."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmserve import native
from swarmserve.chain import ChainState, Genesis, GenesisAccount, GenesisValidator, StateError, sign_transaction
from swarmserve.chain.cheques import sign_cheque
from swarmserve.chain.genesis import ChainParameters
from swarmserve.chain.state import MEMBER_CONSENT
from swarmserve.v1 import chain_pb2
from tests.chainkit import Chain

VALIDATORS = [native.Identity.from_seed(bytes([i]) * 32) for i in range(1, 5)]
ALICE, BOB, CAROL = (native.Identity.from_seed(bytes([i]) * 32) for i in (10, 11, 12))
GENESIS = Genesis(
    name="test",
    created_unix_ms=1,
    validators=[
        GenesisValidator(key=v.public_key.hex(), address=f"127.0.0.1:{7400 + i}") for i, v in enumerate(VALIDATORS)
    ],
    accounts=[
        GenesisAccount(key=ALICE.public_key.hex(), credits=100),
        GenesisAccount(key=BOB.public_key.hex(), credits=10),
        *(GenesisAccount(key=v.public_key.hex(), credits=5, bonded=50) for v in VALIDATORS),
    ],
    parameters=ChainParameters(unbonding_blocks=3),
)
GENESIS_BYTES = GENESIS.encode()


def replicas(count: int = 3) -> list[ChainState]:
    return [ChainState(None, GENESIS, GENESIS_BYTES) for _ in range(count)]


def transfer(sender: native.Identity, nonce: int, to: native.Identity, credits: int, chain: bytes = b"") -> bytes:
    return sign_transaction(
        sender,
        chain or ChainState(None, GENESIS, GENESIS_BYTES).chain_id,
        nonce,
        transfer=chain_pb2.TransferCredits(recipient_key=to.public_key, credits=credits),
    )


CHAIN_ID = ChainState(None, GENESIS, GENESIS_BYTES).chain_id


def test_credits_exist_only_from_genesis_and_move_by_signed_transfers() -> None:
    chain = Chain(GENESIS, replicas())
    state = chain.replicas[0]
    assert state.account(ALICE.public_key).available == 100
    assert state.account(CAROL.public_key).available == 0  # a fresh key holds nothing
    assert state.account(VALIDATORS[0].public_key).bonded == 50
    chain.block([transfer(ALICE, 1, CAROL, 30)])
    assert (state.account(ALICE.public_key).available, state.account(CAROL.public_key).available) == (70, 30)
    assert state.account(ALICE.public_key).nonce == 1
    assert len(chain.roots()) == 1


def test_a_double_spend_applies_exactly_once_on_every_replica() -> None:
    chain = Chain(GENESIS, replicas())
    # Same nonce, whole balance to two recipients (as if submitted through two validators):
    # the first in block order applies, the second is void.
    chain.block([transfer(ALICE, 1, BOB, 100), transfer(ALICE, 1, CAROL, 100)])
    # Consecutive nonces, whole balance twice: the second fails for want of credits.
    chain.block([transfer(BOB, 1, CAROL, 110), transfer(BOB, 2, ALICE, 110)])
    for state in chain.replicas:
        assert state.account(ALICE.public_key).available == 0
        assert state.account(BOB.public_key).available == 0
        assert state.account(CAROL.public_key).available == 110
        assert state.account(BOB.public_key).nonce == 2  # the failed transfer spent its nonce
    assert len(chain.roots()) == 1


def test_replays_forgeries_and_other_chains_transactions_change_nothing() -> None:
    chain = Chain(GENESIS, replicas(1))
    state = chain.replicas[0]
    paid = transfer(ALICE, 1, BOB, 5)
    chain.block([paid])
    root = state.state_root
    forged = chain_pb2.SignedTransaction.FromString(transfer(ALICE, 2, CAROL, 50))
    forged.signature = CAROL.sign(forged.body)  # signed by someone else
    stolen = chain_pb2.SignedTransaction.FromString(transfer(ALICE, 2, CAROL, 50))
    body = chain_pb2.TransactionBody.FromString(stolen.body)
    body.transfer.credits = 95  # altered after signing
    stolen.body = body.SerializeToString()
    applied = chain.block(
        [
            paid,  # replayed: its nonce is spent
            forged.SerializeToString(),
            stolen.SerializeToString(),
            transfer(ALICE, 2, CAROL, 50, chain=b"\x01" * 32),  # another chain's
            b"\x0a\x03abc",  # malformed
            transfer(CAROL, 0, ALICE, 1),  # nonce 0
        ]
    )
    result = state.apply(applied)  # delivered again: nothing changes
    assert result.state_root == state.state_root
    assert state.account(ALICE.public_key).available == 95 and state.account(ALICE.public_key).nonce == 1
    assert state.account(CAROL.public_key).available == 0 and state.account(CAROL.public_key).nonce == 0
    assert state.state_root != root  # only the height and the block moved the root


def test_unbonded_stake_returns_after_the_period_and_bad_evidence_slashes_nobody() -> None:
    chain = Chain(GENESIS, replicas())
    validator = VALIDATORS[0]
    state = chain.replicas[0]
    chain.block([sign_transaction(validator, CHAIN_ID, 1, unbond=chain_pb2.UnbondStake(credits=20))])
    assert state.account(validator.public_key).bonded == 30 and state.account(validator.public_key).unbonding == 20
    chain.block(
        [sign_transaction(validator, CHAIN_ID, 2, unbond=chain_pb2.UnbondStake(credits=31))]
    )  # more than bonded: fails
    chain.block([sign_transaction(validator, CHAIN_ID, 3, bond=chain_pb2.BondStake(credits=5))])
    assert state.account(validator.public_key).available == 0 and state.account(validator.public_key).bonded == 35
    chain.block([])  # height 4 = 1 + unbonding_blocks: released
    assert state.account(validator.public_key).available == 20 and state.account(validator.public_key).unbonding == 0
    garbage = chain_pb2.EquivocationEvidence(evidence=b"not evidence")
    chain.block([sign_transaction(ALICE, CHAIN_ID, 1, equivocation=garbage)])
    assert state.account(VALIDATORS[1].public_key).bonded == 50
    assert state.account(ALICE.public_key).nonce == 1
    assert len(chain.roots()) == 1


def test_forks_gaps_and_strangers_blocks_are_refused(tmp_path: Path) -> None:
    state = ChainState(tmp_path / "chain.sqlite3", GENESIS, GENESIS_BYTES)
    chain = Chain(GENESIS, [state])
    chain.block([transfer(ALICE, 1, BOB, 1)])
    other = native.decode_chain_block(native.encode_chain_block(chain.parent, 2, 5000, []))
    state.apply(other)
    fork = native.decode_chain_block(native.encode_chain_block(chain.parent, 2, 5001, []))
    with pytest.raises(StateError, match="fork"):
        state.apply(fork)
    with pytest.raises(StateError, match="does not follow"):
        state.apply(native.decode_chain_block(native.encode_chain_block(other.digest, 4, 6000, [])))
    with pytest.raises(StateError, match="does not build on"):
        state.apply(native.decode_chain_block(native.encode_chain_block(b"\x07" * 32, 3, 6000, [])))
    height, root = state.height, state.state_root
    state.close()
    reopened = ChainState(tmp_path / "chain.sqlite3", GENESIS, GENESIS_BYTES)
    assert (reopened.height, reopened.state_root) == (height, root)
    assert reopened.blocks(0, 10)[2].block == other.encoded
    reopened.close()
    with sqlite3.connect(tmp_path / "chain.sqlite3") as db:  # as a replica of an older version
        db.execute("DELETE FROM meta WHERE name = 'state_set'")
    with pytest.raises(StateError, match="older swarmserve"):
        ChainState(tmp_path / "chain.sqlite3", GENESIS, GENESIS_BYTES)
    stranger = GENESIS.model_copy(update={"name": "another"})
    with pytest.raises(StateError, match="another chain"):
        ChainState(tmp_path / "chain.sqlite3", stranger, stranger.encode())
    with pytest.raises(StateError, match="another genesis"):
        ChainState(None, stranger, stranger.encode()).apply(
            native.decode_chain_block(native.encode_chain_block(b"\x00" * 32, 0, 0, [GENESIS_BYTES]))
        )


PEOPLE = [ALICE, BOB, CAROL, *VALIDATORS]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), blocks=st.integers(1, 12))
def test_random_streams_give_one_state_root_and_conserve_credits(seed: int, blocks: int) -> None:
    rng = random.Random(seed)
    chain = Chain(GENESIS, replicas(2))
    nonces = dict.fromkeys((p.public_key for p in PEOPLE), 0)
    total = sum(a.credits + a.bonded for a in GENESIS.accounts)
    for _ in range(blocks):
        transactions = []
        for _ in range(rng.randrange(0, 6)):
            who = rng.choice(PEOPLE)
            nonce = nonces[who.public_key] + rng.choice((1, 1, 1, 0, 2))  # mostly right, some replays and gaps
            kind = rng.choice(("transfer", "bond", "unbond", "settle", "add_member"))
            credits = rng.randrange(0, 60)
            other = rng.choice(PEOPLE)
            if kind == "transfer":
                raw = transfer(who, nonce, other, credits)
            elif kind == "settle":  # a cheque from someone to someone, settled by a third
                cheque = sign_cheque(other, CHAIN_ID, rng.choice(PEOPLE).public_key, credits)
                raw = sign_transaction(who, CHAIN_ID, nonce, settle=chain_pb2.SettleCheques(cheques=[cheque]))
            elif kind == "add_member":
                consent = other.sign(MEMBER_CONSENT + CHAIN_ID + who.public_key)
                join = chain_pb2.AddMember(member_key=other.public_key, consent=consent)
                raw = sign_transaction(who, CHAIN_ID, nonce, add_member=join)
            elif kind == "bond":
                raw = sign_transaction(who, CHAIN_ID, nonce, bond=chain_pb2.BondStake(credits=credits))
            else:
                raw = sign_transaction(who, CHAIN_ID, nonce, unbond=chain_pb2.UnbondStake(credits=credits))
            transactions.append(raw)
        chain.block(transactions)
        for person in PEOPLE:
            nonces[person.public_key] = chain.replicas[0].account(person.public_key).nonce
        assert len(chain.roots()) == 1
        state = chain.replicas[0]
        assert state.recount_state_set(), "the kept hash is that of the rows, counted afresh"
        accounts = {state.account(p.public_key).account_key: state.account(p.public_key) for p in PEOPLE}
        assert sum(a.available + a.bonded + a.unbonding for a in accounts.values()) == total


def test_a_transaction_that_raises_is_undone_and_the_block_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever slips past the checks (here a bond made to raise half-way) cannot stop the
    chain: the transaction is undone and counts as failed, the rest of the block applies."""
    chain = Chain(GENESIS, replicas(2))
    original = ChainState._bond

    def bond_then_raise(self: ChainState, key: bytes, credits: int) -> bool:
        original(self, key, credits)
        if credits == 13:
            raise OverflowError("made to raise")
        return True

    monkeypatch.setattr(ChainState, "_bond", bond_then_raise)
    chain.block(
        [
            sign_transaction(ALICE, CHAIN_ID, 1, bond=chain_pb2.BondStake(credits=13)),
            transfer(ALICE, 2, BOB, 1),
        ]
    )
    for state in chain.replicas:
        alice = state.account(ALICE.public_key)
        assert (alice.available, alice.bonded, alice.nonce) == (99, 0, 2)
        assert state.recount_state_set()  # the undone rows left the kept hash too
    assert len(chain.roots()) == 1
