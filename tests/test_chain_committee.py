"""The committee rule (swarmserve/chain/committee.py) alone, and in the state machine on blocks
built here: each epoch's committee is chosen at the last block of the epoch before, from the
candidates, by their accounts' bonded stake; one seat per account; unbonding stake does not
count; too few qualifying candidates leave the committee as it was; candidacies with addresses
the consensus node could not dial are refused; equivocation evidence is judged against the
committee of the epoch it names."""

from __future__ import annotations

from swarmserve import native
from swarmserve.chain import Genesis, GenesisAccount, GenesisValidator, sign_transaction
from swarmserve.chain.committee import Candidate, choose_committee
from swarmserve.chain.genesis import ChainParameters
from swarmserve.v1 import chain_pb2
from tests.chainkit import Chain


def key(n: int) -> bytes:
    return bytes([n]) * 32


CURRENT = [(key(90), "10.0.0.90:1"), (key(91), "10.0.0.91:1")]


def rule(candidates: list[Candidate], size: int = 3, min_committee: int = 2) -> list[tuple[bytes, str]]:
    return choose_committee(candidates, CURRENT, size=size, min_stake=10, min_committee=min_committee)


def test_seats_go_to_the_most_staked_accounts_one_each() -> None:
    candidates = [
        Candidate(key(1), "10.0.0.1:1", key(1), 50),
        Candidate(key(2), "10.0.0.2:1", key(2), 70),
        Candidate(key(3), "10.0.0.3:1", key(3), 9),  # under the minimum stake
        Candidate(key(4), "10.0.0.4:1", key(2), 70),  # a second node of account 2: no second seat
        Candidate(key(5), "10.0.0.5:1", key(5), 50),  # ties with account 1: the lower account wins
        Candidate(key(6), "10.0.0.6:1", key(6), 40),
    ]
    assert rule(candidates) == [(key(1), "10.0.0.1:1"), (key(2), "10.0.0.2:1"), (key(5), "10.0.0.5:1")]
    assert rule(candidates, size=2) == [(key(1), "10.0.0.1:1"), (key(2), "10.0.0.2:1")]
    # Order of the candidates does not matter.
    assert rule(list(reversed(candidates))) == rule(candidates)


def test_too_few_qualifying_candidates_keep_the_committee() -> None:
    lone = [Candidate(key(1), "10.0.0.1:1", key(1), 1_000), Candidate(key(2), "10.0.0.2:1", key(2), 5)]
    assert rule(lone) == CURRENT
    assert rule(lone, min_committee=1) == [(key(1), "10.0.0.1:1")]


VALIDATORS = [native.Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3, 4)]
NEWCOMER = native.Identity.from_seed(b"\x09" * 32)
OPERATOR, OPERATOR_NODE = native.Identity.from_seed(b"\x0a" * 32), native.Identity.from_seed(b"\x0b" * 32)
EPOCH = 5
GENESIS = Genesis(
    name="committees",
    created_unix_ms=1,
    validators=[
        GenesisValidator(key=v.public_key.hex(), address=f"127.0.0.1:{7400 + i}") for i, v in enumerate(VALIDATORS)
    ],
    accounts=[
        *(GenesisAccount(key=v.public_key.hex(), credits=10, bonded=100) for v in VALIDATORS),
        GenesisAccount(key=NEWCOMER.public_key.hex(), credits=500),
        GenesisAccount(key=OPERATOR.public_key.hex(), credits=500, members=[OPERATOR_NODE.public_key.hex()]),
    ],
    parameters=ChainParameters(epoch_blocks=EPOCH, committee_size=4, validator_min_stake=100, min_committee=4),
)


def candidacy(identity: native.Identity, nonce: int, address: str, chain_id: bytes) -> bytes:
    return sign_transaction(identity, chain_id, nonce, candidacy=chain_pb2.ValidatorCandidacy(address=address))


def bond(identity: native.Identity, nonce: int, credits: int, chain_id: bytes) -> bytes:
    return sign_transaction(identity, chain_id, nonce, bond=chain_pb2.BondStake(credits=credits))


def keys(committee: list[tuple[bytes, str]]) -> set[bytes]:
    return {k for k, _ in committee}


def test_the_committee_follows_stake_at_epoch_boundaries() -> None:
    chain = Chain(GENESIS)
    genesis_keys = {v.public_key for v in VALIDATORS}
    assert keys(chain.state.committee_of(0)) == genesis_keys
    chain.until(EPOCH - 1)  # the last block of epoch 0 chooses epoch 1's
    assert keys(chain.state.committee_of(1)) == genesis_keys
    # A newcomer offers to validate and out-stakes everyone; addresses that no consensus node
    # could dial are refused (a name, no port, port 0, garbage, too long).
    cid = chain.chain_id
    refused = ["example.com:7000", "127.0.0.1", "127.0.0.1:0", "::1:80", "x" * 70 + ":1"]
    chain.block([candidacy(NEWCOMER, n, a, cid) for n, a in enumerate(refused, 1)])
    assert chain.state.candidates().keys() == genesis_keys
    chain.block([candidacy(NEWCOMER, 6, "[::1]:7500", cid), bond(NEWCOMER, 7, 300, cid)])
    assert chain.state.candidates()[NEWCOMER.public_key] == "[::1]:7500"
    # Validator 4 starts unbonding all its stake: it no longer counts.
    chain.block([sign_transaction(VALIDATORS[3], cid, 1, unbond=chain_pb2.UnbondStake(credits=100))])
    assert chain.state.committee_of(2) == []  # not chosen before epoch 1's last block
    chain.until(2 * EPOCH - 1)
    expected = genesis_keys - {VALIDATORS[3].public_key} | {NEWCOMER.public_key}
    assert keys(chain.state.committee_of(2)) == expected
    assert dict(chain.state.committee_of(2))[NEWCOMER.public_key] == "[::1]:7500"
    assert keys(chain.state.committee_of(1)) == genesis_keys  # history stays
    # An operator's two nodes both offer: its account fills one seat; with 5 qualifying
    # accounts for 4 seats, the least staked (ties: the higher account key) is left out.
    chain.block(
        [
            bond(OPERATOR, 1, 200, cid),
            candidacy(OPERATOR, 2, "127.0.0.1:7600", cid),
            candidacy(OPERATOR_NODE, 1, "127.0.0.1:7601", cid),
        ]
    )
    chain.until(3 * EPOCH - 1)
    third = keys(chain.state.committee_of(3))
    assert NEWCOMER.public_key in third and len(third) == 4
    assert len(third & {OPERATOR.public_key, OPERATOR_NODE.public_key}) == 1
    # Withdrawing: the newcomer leaves at the next boundary.
    chain.block([candidacy(NEWCOMER, 8, "", cid)])
    chain.until(4 * EPOCH - 1)
    assert NEWCOMER.public_key not in keys(chain.state.committee_of(4))
    assert len(chain.roots()) == 1


def test_too_few_candidates_with_stake_keep_the_committee() -> None:
    chain = Chain(GENESIS)
    cid = chain.chain_id
    # Two validators unbond: two qualifying accounts, fewer than min_committee.
    chain.block([sign_transaction(v, cid, 1, unbond=chain_pb2.UnbondStake(credits=100)) for v in VALIDATORS[:2]])
    chain.until(EPOCH - 1)
    assert keys(chain.state.committee_of(1)) == {v.public_key for v in VALIDATORS}


def test_equivocation_is_judged_against_the_committee_of_its_epoch() -> None:
    """A validator of epoch 0 that is no longer in the committee is still slashed for conflicting
    votes in epoch 0; the same votes claimed for epoch 2, when it was not a validator, and votes
    for an epoch whose committee is not chosen yet, are refused."""
    chain = Chain(GENESIS)
    cid = chain.chain_id
    liar = VALIDATORS[3]
    chain.block([candidacy(NEWCOMER, 1, "127.0.0.1:7500", cid), bond(NEWCOMER, 2, 300, cid)])
    chain.block([sign_transaction(liar, cid, 1, unbond=chain_pb2.UnbondStake(credits=60))])
    chain.until(2 * EPOCH - 1)
    assert liar.public_key not in keys(chain.state.committee_of(2))
    epoch0 = [v.public_key for v in VALIDATORS]
    evidence = native.sign_conflicting_votes(liar, epoch0, 0, 3)
    as_epoch2 = native.sign_conflicting_votes(liar, epoch0, 2, 3)  # signed as if in epoch 2's committee
    future = native.sign_conflicting_votes(liar, epoch0, 7, 3)
    assert native.equivocation_epoch(evidence) == 0 and native.equivocation_epoch(as_epoch2) == 2
    before = chain.state.account(liar.public_key)
    chain.block(
        [
            sign_transaction(NEWCOMER, cid, n, equivocation=chain_pb2.EquivocationEvidence(evidence=e))
            for n, e in ((3, as_epoch2), (4, future))
        ]
    )
    assert chain.state.account(liar.public_key) == before
    chain.block([sign_transaction(NEWCOMER, cid, 5, equivocation=chain_pb2.EquivocationEvidence(evidence=evidence))])
    after = chain.state.account(liar.public_key)
    assert (after.bonded, after.unbonding) == (20, 30)  # half of 40 bonded and of 60 unbonding
