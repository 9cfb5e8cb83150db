"""The ledger's chain in running nodes (real gossip, gRPC and consensus sockets on loopback):
four relays are the committee of a genesis file, a fifth relay follows. Transactions submitted
through any node's ``Chain`` service (a follower passes them to a validator) are finalized and
applied everywhere with one state root per height; a double spend submitted through two
validators at once applies exactly once; a fresh key holds nothing; a follower fetches blocks
from members and applies only those the committee's certificates prove, and catches up after
a restart; malformed and stale transactions are refused with INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.relay.config import RelayConfig
from services.relay.node import RelayNode
from swarmserve import native
from swarmserve.chain import Genesis, GenesisAccount, GenesisValidator, sign_transaction
from swarmserve.chain.audit import audit_replica
from swarmserve.chain.cheques import sign_cheque
from swarmserve.chain.genesis import ChainParameters
from swarmserve.chain.state import MEMBER_CONSENT
from swarmserve.config import LedgerSettings, ServerSettings
from swarmserve.keys import NodeKeys
from swarmserve.rpc import InvalidArgument
from swarmserve.v1 import chain_pb2, chain_pb2_grpc
from tests.conftest import FAST_GOSSIP, joining

ALICE, BOB, CAROL = (native.Identity.generate() for _ in range(3))
FAST_CHAIN = ChainParameters(block_interval_ms=100, leader_timeout_ms=500)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ChainSwarm:
    nodes: list[RelayNode]
    genesis: Genesis
    chain_id: bytes
    restart: Callable[[int], object]

    def stub(self, index: int) -> chain_pb2_grpc.ChainStub:
        return chain_pb2_grpc.ChainStub(aio.insecure_channel(self.nodes[index].address))

    async def wait(self, predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            heights = [n.chain.state.height if n.chain else None for n in self.nodes]
            assert time.monotonic() < deadline, f"timed out waiting for {what} (heights {heights})"
            await asyncio.sleep(0.05)

    def accounts(self, key: bytes) -> set[tuple[int, int, int]]:
        return {
            (a.available, a.bonded, a.nonce)
            for n in self.nodes
            if n.chain is not None
            for a in [n.chain.state.account(key)]
        }


@pytest.fixture
def chain_swarm(tmp_path: Path) -> Callable[[], object]:
    @asynccontextmanager
    async def start(
        parameters: ChainParameters = FAST_CHAIN, follower_bonded: int = 0, resend_after_s: float | None = None
    ) -> AsyncIterator[ChainSwarm]:
        identities = [NodeKeys.load_or_create(tmp_path / f"relay{i}").identity for i in range(5)]
        genesis = Genesis(
            name="test-chain",
            created_unix_ms=1,
            validators=[
                GenesisValidator(key=identity.public_key.hex(), address=f"127.0.0.1:{free_port()}")
                for identity in identities[:4]
            ],
            accounts=[
                GenesisAccount(key=ALICE.public_key.hex(), credits=100),
                *(GenesisAccount(key=i.public_key.hex(), credits=10, bonded=50) for i in identities[:4]),
                *[GenesisAccount(key=identities[4].public_key.hex(), credits=10, bonded=follower_bonded)][
                    : 1 if follower_bonded else 0
                ],
            ],
            parameters=parameters,
        )
        genesis_file = tmp_path / "genesis.json"
        genesis_file.write_bytes(genesis.encode())
        nodes: list[RelayNode] = []

        def config(index: int) -> RelayConfig:
            return RelayConfig(
                data_dir=tmp_path / f"relay{index}",
                server=ServerSettings(listen="127.0.0.1:0"),
                gossip=joining(nodes, FAST_GOSSIP),
                ledger=LedgerSettings(genesis=genesis_file, chain_sync_interval_s=0.2, resend_after_s=resend_after_s),
            )

        async def restart(index: int) -> None:
            await nodes[index].stop(0)
            nodes[index] = RelayNode(config(index))
            await nodes[index].start()

        try:
            for index in range(5):
                node = RelayNode(config(index))
                await node.start()
                nodes.append(node)
            assert nodes[0].chain is not None
            yield ChainSwarm(nodes, genesis, nodes[0].chain.chain_id, restart)
        finally:
            for node in reversed(nodes):
                await node.stop(0)

    return start


def transfer(
    sender: native.Identity, chain_id: bytes, nonce: int, to: native.Identity, credits: int
) -> chain_pb2.SignedTransaction:
    raw = sign_transaction(
        sender, chain_id, nonce, transfer=chain_pb2.TransferCredits(recipient_key=to.public_key, credits=credits)
    )
    return chain_pb2.SignedTransaction.FromString(raw)


async def test_transactions_through_any_node_are_applied_everywhere_with_one_state_root(
    chain_swarm: Callable[[], object],
) -> None:
    async with chain_swarm() as swarm:  # type: ignore[attr-defined]
        assert [n.chain.validator for n in swarm.nodes] == [True, True, True, True, False]
        # Through the follower (passed on to a validator) and through a validator.
        queued = await swarm.stub(4).Submit(
            chain_pb2.SubmitTransactionRequest(transaction=transfer(ALICE, swarm.chain_id, 1, BOB, 30))
        )
        assert queued.queued
        await swarm.wait(lambda: swarm.accounts(BOB.public_key) == {(30, 0, 0)}, "the first transfer on every node")
        await swarm.stub(2).Submit(
            chain_pb2.SubmitTransactionRequest(transaction=transfer(BOB, swarm.chain_id, 1, CAROL, 5))
        )
        await swarm.wait(lambda: swarm.accounts(CAROL.public_key) == {(5, 0, 0)}, "the transfers on every node")
        assert swarm.accounts(ALICE.public_key) == {(70, 0, 1)}
        assert swarm.accounts(BOB.public_key) == {(25, 0, 1)}
        # A fresh key holds nothing, on every node.
        account = await swarm.stub(4).GetAccount(
            chain_pb2.GetAccountRequest(account_key=native.Identity.generate().public_key)
        )
        assert (account.available, account.bonded, account.nonce) == (0, 0, 0)
        # One state root per height, validators and follower alike.
        height = min(n.chain.state.height for n in swarm.nodes)
        assert height >= 2
        for h in range(height + 1):
            assert len({n.chain.state.root_at(h) for n in swarm.nodes}) == 1, f"one root at height {h}"
        status = await swarm.stub(4).GetStatus(chain_pb2.GetChainStatusRequest())
        assert status.chain_id == swarm.chain_id and not status.validator and len(status.validators) == 4


async def test_a_double_spend_through_two_validators_applies_once(chain_swarm: Callable[[], object]) -> None:
    async with chain_swarm() as swarm:  # type: ignore[attr-defined]
        # One nonce, the whole balance, two recipients, two validators, at once.
        await asyncio.gather(
            swarm.stub(0).Submit(
                chain_pb2.SubmitTransactionRequest(transaction=transfer(ALICE, swarm.chain_id, 1, BOB, 100))
            ),
            swarm.stub(3).Submit(
                chain_pb2.SubmitTransactionRequest(transaction=transfer(ALICE, swarm.chain_id, 1, CAROL, 100))
            ),
        )
        await swarm.wait(lambda: swarm.accounts(ALICE.public_key) == {(0, 0, 1)}, "the spend on every node")
        await asyncio.sleep(1.0)  # later blocks change nothing: the other transfer is void
        paid = swarm.accounts(BOB.public_key) | swarm.accounts(CAROL.public_key)
        assert paid == {(100, 0, 0), (0, 0, 0)}, "exactly one recipient was paid, the same one everywhere"
        assert len(swarm.accounts(BOB.public_key)) == 1


async def test_bad_and_stale_transactions_are_refused(chain_swarm: Callable[[], object]) -> None:
    async with chain_swarm() as swarm:  # type: ignore[attr-defined]
        stub = swarm.stub(1)
        forged = transfer(ALICE, swarm.chain_id, 1, BOB, 100)
        forged.signature = BOB.sign(forged.body)
        other_chain = transfer(ALICE, b"\x01" * 32, 1, BOB, 100)
        garbage = chain_pb2.SignedTransaction(body=b"\x12\x01", signature=b"")
        for bad, reason in ((forged, "bad signature"), (other_chain, "another chain"), (garbage, "malformed")):
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.Submit(chain_pb2.SubmitTransactionRequest(transaction=bad))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in (
                refused.value.details() or ""
            )
        await stub.Submit(chain_pb2.SubmitTransactionRequest(transaction=transfer(ALICE, swarm.chain_id, 1, BOB, 1)))
        await swarm.wait(lambda: swarm.accounts(ALICE.public_key) == {(99, 0, 1)}, "the transfer")
        with pytest.raises(aio.AioRpcError) as stale:
            await swarm.stub(4).Submit(
                chain_pb2.SubmitTransactionRequest(transaction=transfer(ALICE, swarm.chain_id, 1, CAROL, 1))
            )
        assert stale.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already spent" in (
            stale.value.details() or ""
        )
        with pytest.raises(aio.AioRpcError) as too_many:
            await stub.GetBlocks(chain_pb2.GetBlocksRequest(from_height=0, limit=10_000))
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_nodes_transaction_finalized_before_its_predecessor_is_sent_again(
    chain_swarm: Callable[[], object],
) -> None:
    """Nonce 2 reaches a block before nonce 1 (as when they go through different validators):
    void there, it is held by the node's outbox and sent again, and applies once 1 has."""
    # Resent after 5 s: nonce 1 is not sent by the outbox before the test has nonce 2 voided.
    async with chain_swarm(FAST_CHAIN, follower_bonded=1, resend_after_s=5.0) as swarm:  # type: ignore[attr-defined]
        replica = swarm.nodes[4].chain  # the follower: it submits through the validators
        me = replica.identity.public_key
        first, second = (
            replica.sign(transfer=chain_pb2.TransferCredits(recipient_key=CAROL.public_key, credits=credits))
            for credits in (1, 2)
        )
        await replica.submit(second)
        await swarm.wait(lambda: replica.rejected["void"] >= 1, "nonce 2 void in a block")
        # Sent by the test or, if the test was slower, already by the outbox (then "already spent").
        with contextlib.suppress(InvalidArgument):
            await replica.submit(first)
        await swarm.wait(lambda: swarm.accounts(me) == {(10 - 3, 1, 2)}, "both applied, on every node")
        assert swarm.accounts(CAROL.public_key) == {(3, 0, 0)}


async def test_a_restarted_follower_catches_up_from_members(chain_swarm: Callable[[], object]) -> None:
    async with chain_swarm() as swarm:  # type: ignore[attr-defined]
        follower = swarm.nodes[4]
        await swarm.wait(lambda: follower.chain.state.height >= 3, "the follower's first blocks")
        await swarm.restart(4)
        await swarm.stub(0).Submit(
            chain_pb2.SubmitTransactionRequest(transaction=transfer(ALICE, swarm.chain_id, 1, BOB, 7))
        )
        await swarm.wait(lambda: swarm.accounts(BOB.public_key) == {(7, 0, 0)}, "the restarted follower")
        validator_height = swarm.nodes[0].chain.state.height
        await swarm.wait(lambda: swarm.nodes[4].chain.state.height >= validator_height, "the follower at the tip")


async def test_a_validator_that_signs_conflicting_votes_is_slashed_once_and_the_chain_goes_on(
    chain_swarm: Callable[[], object],
) -> None:
    """Validator 3 signs two notarize votes for different blocks in one view (with its own key,
    the bytes honest validators report as evidence); anyone submits them through any node. Tried
    too: the evidence again (one fault, one punishment), garbage, and votes by a key outside the
    committee (refused when signed)."""
    async with chain_swarm() as swarm:  # type: ignore[attr-defined]
        committee = [bytes.fromhex(v.key) for v in swarm.genesis.validators]
        liar = swarm.nodes[3].keys.identity
        evidence = native.sign_conflicting_votes(liar, committee, 0, 5)
        assert native.verify_equivocation(committee, evidence) == ("conflicting notarize", 0, 5, liar.public_key)
        with pytest.raises(ValueError, match="not in the committee"):
            native.sign_conflicting_votes(ALICE, committee, 0, 5)
        reports = [
            sign_transaction(ALICE, swarm.chain_id, 1, equivocation=chain_pb2.EquivocationEvidence(evidence=evidence)),
            sign_transaction(BOB, swarm.chain_id, 1, equivocation=chain_pb2.EquivocationEvidence(evidence=evidence)),
            sign_transaction(CAROL, swarm.chain_id, 1, equivocation=chain_pb2.EquivocationEvidence(evidence=b"x")),
        ]
        for index, raw in enumerate(reports):
            await swarm.stub(index % 5).Submit(
                chain_pb2.SubmitTransactionRequest(transaction=chain_pb2.SignedTransaction.FromString(raw))
            )
        await swarm.wait(
            lambda: all(
                n.chain.state.account(k.public_key).nonce == 1 for n in swarm.nodes for k in (ALICE, BOB, CAROL)
            ),
            "every report in a block on every node",
        )
        # Half of its 50 bonded burned, once; the others untouched; one state, no fork.
        assert swarm.accounts(liar.public_key) == {(10, 25, 0)}
        for honest in swarm.nodes[:3]:
            assert swarm.accounts(honest.keys.identity.public_key) == {(10, 50, 0)}
        height = min(n.chain.state.height for n in swarm.nodes)
        assert len({n.chain.state.root_at(height) for n in swarm.nodes}) == 1
        before = height
        await swarm.wait(lambda: min(n.chain.state.height for n in swarm.nodes) > before + 3, "the chain going on")


async def test_a_validator_equivocating_inside_consensus_is_reported_by_the_others_and_slashed(
    chain_swarm: Callable[[], object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validator 3 runs a consensus node that, for every notarize vote it casts, signs a second
    one for another block in the same view and sends it to every validator (a Byzantine
    validator trying to fork the chain: ``ConsensusNode(equivocate=True)``). Nobody hands the
    ledger evidence: the honest validators see the conflicting votes themselves, each submits
    them, and the chain slashes the liar (each fault once, however many report it). No fork: one
    state root per height on every node, and the chain goes on."""
    liar = NodeKeys.load_or_create(tmp_path / "relay3").identity.public_key
    honest_node = native.ConsensusNode

    def consensus_node(identity: native.Identity, *args: object, **kwargs: object) -> native.ConsensusNode:
        return honest_node(identity, *args, equivocate=identity.public_key == liar, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(native, "ConsensusNode", consensus_node)
    async with chain_swarm() as swarm:  # type: ignore[attr-defined]
        await swarm.wait(
            lambda: all(n.chain.state.account(liar).bonded < 50 for n in swarm.nodes), "the liar slashed everywhere"
        )
        slashed = min(n.chain.state.height for n in swarm.nodes)
        await swarm.wait(lambda: min(n.chain.state.height for n in swarm.nodes) > slashed + 10, "the chain going on")
        height = min(n.chain.state.height for n in swarm.nodes)
        for h in range(height + 1):
            assert len({n.chain.state.root_at(h) for n in swarm.nodes}) == 1, f"one root at height {h}"
        ((available, bonded, _),) = swarm.accounts(liar)
        assert available == 10 and bonded <= 25  # at least one fault punished, half each time
        for honest in swarm.nodes[:3]:  # they reported it (their nonces moved), and lost nothing
            assert {(a, b) for a, b, _ in swarm.accounts(honest.keys.identity.public_key)} == {(10, 50)}


async def test_the_committee_changes_with_stake_at_an_epoch_boundary(chain_swarm: Callable[..., object]) -> None:
    """Relay 4, a follower whose account bonded the most, offers to validate; at the next epoch
    boundary the committee (4 seats) takes it and leaves out the genesis validator with the
    highest key. Relay 4 starts its consensus node and validates, that validator goes back to
    following, and the chain goes on under certificates of the new committee. Every node holds
    one state root per height and replays its chain cleanly, each certificate checked against
    the committee of its epoch."""
    parameters = ChainParameters(
        block_interval_ms=100,
        leader_timeout_ms=500,
        epoch_blocks=20,
        committee_size=4,
        validator_min_stake=50,
        min_committee=4,
    )
    async with chain_swarm(parameters, follower_bonded=100) as swarm:  # type: ignore[attr-defined]
        newcomer = swarm.nodes[4]
        me = newcomer.keys.identity
        address = f"127.0.0.1:{free_port()}"
        offer = sign_transaction(me, swarm.chain_id, 1, candidacy=chain_pb2.ValidatorCandidacy(address=address))
        await swarm.stub(4).Submit(
            chain_pb2.SubmitTransactionRequest(transaction=chain_pb2.SignedTransaction.FromString(offer))
        )
        await swarm.wait(
            lambda: all(n.chain.state.candidates().get(me.public_key) == address for n in swarm.nodes),
            "the candidacy on every node",
        )
        state = newcomer.chain.state
        epoch = state.epoch_of(state.height) + 1  # the first committee chosen after the candidacy
        genesis_keys = {bytes.fromhex(v.key) for v in swarm.genesis.validators}
        leaving = max(genesis_keys)
        leaver = next(n for n in swarm.nodes if n.keys.identity.public_key == leaving)
        await swarm.wait(lambda: newcomer.chain.validator and not leaver.chain.validator, "the roles swapped", 40)
        committee = [key for key, _ in state.committee_of(epoch)]
        assert set(committee) == genesis_keys - {leaving} | {me.public_key}
        status = await swarm.stub(4).GetStatus(chain_pb2.GetChainStatusRequest())
        assert status.validator and {v.key for v in status.validators} == set(committee)
        # The chain goes on: the new epoch's blocks are finalized by its committee, on every node.
        end = state.last_of_epoch(epoch)
        await swarm.wait(lambda: min(n.chain.state.height for n in swarm.nodes) > end, "the new epoch everywhere", 60)
        certified = [b for b in state.blocks(end + 1 - parameters.epoch_blocks, 20) if b.certificate]
        assert certified, "blocks of the new epoch carry certificates"
        for entry in certified:
            assert native.verify_finalization(committee, entry.certificate)[0] == epoch
        height = min(n.chain.state.height for n in swarm.nodes)
        for h in range(height + 1):
            assert len({n.chain.state.root_at(h) for n in swarm.nodes}) == 1, f"one root at height {h}"
        for node in swarm.nodes:
            report = audit_replica(node.chain.state)
            assert not report.problems and report.replayed > end, report


async def test_random_transactions_to_random_nodes_leave_one_state_everywhere(
    chain_swarm: Callable[[], object],
) -> None:
    """For a few seconds, random transfers, bonds, unbonds, cheque settlements, memberships and
    bogus verdicts and appeals, signed by funded and fresh keys (some with stale or future nonces),
    go to random nodes at once. Then: every node holds the same state root at every height, no
    credit was minted or lost, and the fresh keys, which started with nothing, hold nothing they
    were not sent."""
    async with chain_swarm() as swarm:  # type: ignore[attr-defined]
        rng = random.Random(7)
        funded = [ALICE, *(n.keys.identity for n in swarm.nodes[:4])]
        fresh = [native.Identity.generate() for _ in range(4)]
        people = funded + fresh
        total = sum(a.credits + a.bonded for a in swarm.genesis.accounts)

        def action(who: native.Identity) -> dict[str, object]:
            other = rng.choice(people)
            credits = rng.randrange(1, 40)
            match rng.randrange(7):
                case 0 | 1:
                    return {"transfer": chain_pb2.TransferCredits(recipient_key=other.public_key, credits=credits)}
                case 2:
                    return {"bond": chain_pb2.BondStake(credits=credits)}
                case 3:
                    return {"unbond": chain_pb2.UnbondStake(credits=credits)}
                case 4:
                    cheque = sign_cheque(other, swarm.chain_id, rng.choice(people).public_key, credits)
                    return {"settle": chain_pb2.SettleCheques(cheques=[cheque])}
                case 5:
                    consent = other.sign(MEMBER_CONSENT + swarm.chain_id + who.public_key)
                    return {"add_member": chain_pb2.AddMember(member_key=other.public_key, consent=consent)}
                case _:
                    return {"appeal": chain_pb2.AppealVerdict(verdict_id=rng.randbytes(32))}

        deadline = time.monotonic() + 5.0
        sent = 0
        while time.monotonic() < deadline:
            batch = []
            for who in rng.sample(people, 6):
                applied = swarm.nodes[0].chain.state.account(who.public_key).nonce
                nonce = applied + rng.choice((1, 1, 1, 1, 0, 2))  # mostly the next; some replays and gaps
                raw = sign_transaction(who, swarm.chain_id, max(1, nonce), **action(who))  # type: ignore[arg-type]
                request = chain_pb2.SubmitTransactionRequest(transaction=chain_pb2.SignedTransaction.FromString(raw))
                batch.append(swarm.stub(rng.randrange(5)).Submit(request))
            results = await asyncio.gather(*batch, return_exceptions=True)
            sent += len(results)
            await asyncio.sleep(0.25)
        assert sent >= 60
        target = max(n.chain.state.height for n in swarm.nodes) + 3
        await swarm.wait(lambda: min(n.chain.state.height for n in swarm.nodes) >= target, "every node past the load")
        for h in range(target + 1):
            assert len({n.chain.state.root_at(h) for n in swarm.nodes}) == 1, f"one root at height {h}"
        state = swarm.nodes[4].chain.state
        accounts = {state.account(p.public_key).account_key: state.account(p.public_key) for p in people}
        assert sum(a.available + a.bonded + a.unbonding for a in accounts.values()) == total
        assert sum(state.account(p.public_key).nonce for p in people) >= 20  # the load was decided, not refused
