"""The credit ledger with real SQLite files, real signatures and real gRPC between replicas.
Tried: forged and altered entries, a fork (two entries at one sequence: a double spend), an
overdraft, a replayed receipt and a replayed verdict, a receipt not co-signed by the payer (an
unknown signer), broken links and gaps; each refused by every replica. Two nodes that wrote
while apart converge to the same heads and balances once they meet; a writer killed mid-write
loses no committed entry (`swarmserve ledger verify` afterwards)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.relay.config import RelayConfig
from services.relay.node import RelayNode
from swarmserve import native
from swarmserve.config import ServerSettings
from swarmserve.ledger import GRANT_CREDITS, LedgerRejection, LedgerReplica, sign_entry
from swarmserve.receipts import ReceiptWriter
from swarmserve.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc, verifier_pb2
from swarmserve.verdicts import sign_verdict
from tests.conftest import FAST_GOSSIP, joining

ROOT = Path(__file__).resolve().parent.parent


def receipt(provider: native.Identity, request_id: str = "r1") -> common_pb2.SignedReceipt:
    writer = ReceiptWriter(provider, request_id, bytes(32), [1, 2, 3], common_pb2.SamplingParams(max_new_tokens=2))
    writer.add(5, b"a")
    writer.add(6, b"b")
    return writer.sign(common_pb2.FINISH_REASON_LENGTH, common_pb2.Timing())


def cosigned(signed: common_pb2.SignedReceipt, router: native.Identity) -> common_pb2.SignedReceipt:
    copy = common_pb2.SignedReceipt()
    copy.CopyFrom(signed)
    copy.cosignatures.add(signer_key=router.public_key, signature=router.sign(signed.receipt))
    return copy


def next_entry(replica: LedgerReplica, identity: native.Identity, **kind: object) -> ledger_pb2.LedgerEntry:
    sequence, previous, issued = replica.head(identity.public_key)
    return sign_entry(identity, sequence + 1, previous, issued, **kind)


@pytest.fixture
def replica(tmp_path: Path) -> LedgerReplica:
    return LedgerReplica(tmp_path / "ledger.sqlite3")


def test_balances_follow_grants_payments_stake_and_transfers(replica: LedgerReplica) -> None:
    router, provider, verifier = (native.Identity.generate() for _ in range(3))
    replica.append(provider, stake=ledger_pb2.StakeChange(delta=40))  # grant first, implicitly
    replica.append(verifier, grant=ledger_pb2.Grant(credits=GRANT_CREDITS))
    work = cosigned(receipt(provider), router)
    replica.append(router, served=ledger_pb2.ServedWork(receipt=work, payer_key=router.public_key, credits=30))
    replica.append(router, transfer=ledger_pb2.Transfer(recipient_key=verifier.public_key, credits=20))
    verdict = verifier_pb2.Verdict(
        kind=verifier_pb2.VERDICT_KIND_CHECK,
        provider_key=provider.public_key,
        outcome=verifier_pb2.VERDICT_OUTCOME_FAIL,
        score=0.0,
    ).SerializeToString()
    signed = verifier_pb2.SignedVerdict(
        verdict=verdict, verifier_key=verifier.public_key, signature=verifier.sign(verdict)
    )
    replica.append(verifier, verdict=ledger_pb2.VerdictRecord(verdict=signed, slash_permille=500))

    assert (replica.balance(router.public_key).available, replica.balance(router.public_key).entries) == (50, 3)
    provider_balance = replica.balance(provider.public_key)
    assert (provider_balance.available, provider_balance.staked) == (GRANT_CREDITS - 40 + 30, 20)
    assert replica.balance(verifier.public_key).available == GRANT_CREDITS + 20
    assert replica.verify().problems == []

    # Each rule, tried: every one is refused with the rule in the message, and nothing changes.
    head_before = replica.heads()
    attempts = {
        "double spend": next_entry(
            replica, router, transfer=ledger_pb2.Transfer(recipient_key=provider.public_key, credits=51)
        ),
        "already paid": next_entry(
            replica, router, served=ledger_pb2.ServedWork(receipt=work, payer_key=router.public_key, credits=1)
        ),
        "already recorded": next_entry(replica, verifier, verdict=ledger_pb2.VerdictRecord(verdict=signed)),
        "unknown signer": next_entry(
            replica,
            router,
            served=ledger_pb2.ServedWork(
                receipt=cosigned(receipt(provider, "r2"), verifier), payer_key=router.public_key, credits=1
            ),
        ),
        "grant, and only there": next_entry(replica, router, grant=ledger_pb2.Grant(credits=GRANT_CREDITS)),
        "releases": next_entry(replica, provider, stake=ledger_pb2.StakeChange(delta=-21)),
    }
    for words, entry in attempts.items():
        result = replica.accept([entry])
        assert result.accepted == 0 and len(result.rejected) == 1 and words in result.rejected[0], (words, result)
    assert replica.heads() == head_before


def test_forged_altered_broken_and_forked_entries_are_refused(replica: LedgerReplica) -> None:
    alice, mallory = native.Identity.generate(), native.Identity.generate()
    replica.append(alice, stake=ledger_pb2.StakeChange(delta=10))
    good = next_entry(replica, alice, transfer=ledger_pb2.Transfer(recipient_key=mallory.public_key, credits=5))

    forged = ledger_pb2.LedgerEntry(body=good.body, signature=mallory.sign(good.body))
    body = ledger_pb2.EntryBody.FromString(good.body)
    body.transfer.credits = 90
    altered = ledger_pb2.LedgerEntry(body=body.SerializeToString(), signature=good.signature)
    broken = sign_entry(
        alice, 3, bytes(32), 0, transfer=ledger_pb2.Transfer(recipient_key=mallory.public_key, credits=1)
    )
    for entry, words in ((forged, "forged or altered"), (altered, "forged or altered"), (broken, "broken link")):
        result = replica.accept([entry])
        assert result.accepted == 0 and words in result.rejected[0], result

    assert replica.accept([good]).accepted == 1
    assert replica.accept([good]).duplicates == 1  # the same entry again is harmless
    fork = next_entry(replica, alice, transfer=ledger_pb2.Transfer(recipient_key=alice.public_key, credits=1))
    fork_body = ledger_pb2.EntryBody.FromString(fork.body)
    fork_body.sequence -= 1  # the same sequence as `good`, spending the same credits elsewhere
    fork_body.previous_hash = ledger_pb2.EntryBody.FromString(good.body).previous_hash
    forking = ledger_pb2.LedgerEntry(
        body=fork_body.SerializeToString(), signature=alice.sign(fork_body.SerializeToString())
    )
    result = replica.accept([forking])
    assert "double spend" in result.rejected[0]
    frozen = replica.balance(alice.public_key)
    assert frozen.frozen and frozen.available == 0 and frozen.staked == 0
    with pytest.raises(LedgerRejection, match="frozen"):
        replica.append(alice, transfer=ledger_pb2.Transfer(recipient_key=mallory.public_key, credits=1))


def vote(judge: native.Identity, duel: str, voted_for: bytes, other: bytes) -> verifier_pb2.SignedVerdict:
    return sign_verdict(
        judge,
        verifier_pb2.Verdict(
            kind=verifier_pb2.VERDICT_KIND_DUEL,
            subject_id=duel,
            provider_key=voted_for,
            opponent_key=other,
            outcome=verifier_pb2.VERDICT_OUTCOME_PASS,
            score=0.3,
        ),
    )


def duel_result(
    organiser: native.Identity, duel: str, winner: bytes, loser: bytes, votes: list[verifier_pb2.SignedVerdict]
) -> ledger_pb2.VerdictRecord:
    result = verifier_pb2.Verdict(
        kind=verifier_pb2.VERDICT_KIND_DUEL_RESULT,
        subject_id=duel,
        provider_key=winner,
        opponent_key=loser,
        outcome=verifier_pb2.VERDICT_OUTCOME_PASS,
        score=1.0,
        votes=votes,
    )
    return ledger_pb2.VerdictRecord(verdict=sign_verdict(organiser, result), slash_permille=100)


def test_a_duel_result_is_recorded_only_if_its_votes_make_the_winner(replica: LedgerReplica) -> None:
    """Tried: a result backed by its votes (accepted, the loser's stake slashed); a minority
    winner; a forged vote; a party voting in its own duel; a judge voting twice; a vote about
    another duel; a lone vote recorded as a verdict."""
    router, good, bad, *judges = (native.Identity.generate() for _ in range(6))
    replica.append(bad, stake=ledger_pb2.StakeChange(delta=40))
    g, b = good.public_key, bad.public_key
    votes = [vote(judges[0], "d1", g, b), vote(judges[1], "d1", g, b), vote(judges[2], "d1", b, g)]
    replica.append(router, verdict=duel_result(router, "d1", g, b, votes))
    assert replica.balance(b).staked == 36 and replica.balance(g).staked == 0

    forged = verifier_pb2.SignedVerdict()
    forged.CopyFrom(votes[1])
    forged.signature = judges[0].sign(forged.verdict)
    refused = [
        (duel_result(router, "d2", b, g, [vote(judges[0], "d2", g, b), vote(judges[1], "d2", b, g)]), "do not make"),
        (duel_result(router, "d3", g, b, [vote(judges[0], "d3", g, b), vote(good, "d3", g, b)]), "party"),
        (duel_result(router, "d4", g, b, [vote(judges[0], "d4", g, b), vote(judges[0], "d4", g, b)]), "twice"),
        (duel_result(router, "d5", g, b, [vote(judges[0], "d1", g, b)]), "not about duel"),
        (ledger_pb2.VerdictRecord(verdict=votes[0]), "recorded by the verifier"),
        (ledger_pb2.VerdictRecord(verdict=vote(router, "d6", g, b)), "only inside"),
    ]
    for record, words in refused:
        with pytest.raises(LedgerRejection, match=words):
            replica.append(router, verdict=record)
    forged_result = duel_result(router, "d7", g, b, [vote(judges[0], "d7", g, b), forged])
    with pytest.raises(LedgerRejection, match="signature is invalid"):
        replica.append(router, verdict=forged_result)
    assert replica.verify().problems == []


async def start_relay(tmp_path: Path, name: str, seeds: list[str]) -> RelayNode:
    config = RelayConfig(
        data_dir=tmp_path / name,
        server=ServerSettings(listen="127.0.0.1:0", grace_period_s=1),
        gossip=FAST_GOSSIP.model_copy(update={"seeds": seeds}),
        ledger={"sync_interval_s": 0.2},
    )
    node = RelayNode(config)
    await node.start()
    return node


@pytest.fixture
async def relays(tmp_path: Path) -> AsyncIterator[list[RelayNode]]:
    async with AsyncExitStack() as stack:
        nodes: list[RelayNode] = []
        for name in ("a", "b", "c"):
            node = await start_relay(tmp_path, name, [])  # apart: nobody knows anybody
            stack.push_async_callback(node.stop, 0)
            nodes.append(node)
        yield nodes


async def test_bad_entries_are_refused_by_every_replica_over_grpc(relays: list[RelayNode]) -> None:
    alice = native.Identity.generate()
    local = LedgerReplica(None)
    first = next_entry(local, alice, grant=ledger_pb2.Grant(credits=GRANT_CREDITS))
    local.accept([first])
    spend = next_entry(local, alice, transfer=ledger_pb2.Transfer(recipient_key=bytes(range(32)), credits=60))
    double = next_entry(local, alice, transfer=ledger_pb2.Transfer(recipient_key=bytes(range(1, 33)), credits=60))
    forged = ledger_pb2.LedgerEntry(body=spend.body, signature=native.Identity.generate().sign(spend.body))
    for node in relays:
        async with aio.insecure_channel(node.address) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            assert (await stub.PushEntries(ledger_pb2.PushEntriesRequest(entries=[first, spend]))).accepted == 2
            for bad, words in ((forged, "forged"), (double, "double spend"), (spend, "")):
                if not words:  # a replay of an entry already held: a duplicate, not a second spend
                    assert (await stub.PushEntries(ledger_pb2.PushEntriesRequest(entries=[bad]))).duplicates == 1
                    continue
                with pytest.raises(aio.AioRpcError) as refused:
                    await stub.PushEntries(ledger_pb2.PushEntriesRequest(entries=[bad]))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (
                    refused.value.details() or ""
                )
            balance = await stub.GetBalance(ledger_pb2.GetBalanceRequest(account_key=alice.public_key))
            assert balance.available == 0  # frozen by the fork proof it now holds
        assert node.ledger.forked(alice.public_key)


async def test_partitioned_replicas_converge_when_they_meet(relays: list[RelayNode]) -> None:
    a, b, c = relays
    for node in relays:  # each writes while apart
        for _ in range(3):
            node.ledger.append(
                node.keys.identity, transfer=ledger_pb2.Transfer(recipient_key=a.keys.identity.public_key, credits=1)
            )
    assert len({tuple((h.author_key, h.entry_hash) for h in n.ledger.heads()) for n in relays}) == 3
    for node in (b, c):  # they meet: b and c join through a
        node.membership.settings = joining([a])
        await node.membership.join()

    async def converged() -> bool:
        views = {tuple((h.author_key, h.sequence, h.entry_hash) for h in n.ledger.heads()) for n in relays}
        return len(views) == 1 and len(next(iter(views))) == 3

    for _ in range(100):
        if await converged():
            break
        await asyncio.sleep(0.1)
    assert await converged()
    assert {n.ledger.balance(a.keys.identity.public_key).available for n in relays} == {GRANT_CREDITS - 3 + 9}


def test_a_writer_killed_mid_write_loses_no_committed_entry(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from pathlib import Path\n"
            "from swarmserve import native\n"
            "from swarmserve.ledger import LedgerReplica\n"
            "from swarmserve.v1 import ledger_pb2\n"
            "me = native.Identity.generate()\n"
            f"replica = LedgerReplica(Path({str(tmp_path / 'ledger.sqlite3')!r}))\n"
            "while True:\n"
            "    entry = replica.append(me, stake=ledger_pb2.StakeChange(delta=0))\n"
            "    print(ledger_pb2.EntryBody.FromString(entry.body).sequence, flush=True)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    committed = [int(writer.stdout.readline()) for _ in range(50)]
    os.kill(writer.pid, signal.SIGKILL)  # in the middle of whatever write comes next
    writer.wait()
    check = subprocess.run(
        [sys.executable, "-m", "swarmserve.cli", "ledger", "verify", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
    replica = LedgerReplica(tmp_path / "ledger.sqlite3")
    (head,) = replica.heads()
    assert head.sequence >= committed[-1]
