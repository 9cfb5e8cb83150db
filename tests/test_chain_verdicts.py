"""Verdicts in the ledger's state machine (swarmserve/chain/state.py, lottery.py, evidence.py), on
blocks built here. What was tried, and must fail: a verdict from a verifier the lottery did not
draw, signed by another key than the transaction's, with a stale seed, a FAIL without the stream
or with tampered tokens or prompt, a check only the provider's own account co-signed, a second
verdict on one receipt, an appeal by someone else or too late, votes by non-jurors and second
votes, a duel judged by an undrawn judge or whose votes do not make the winner. And what must
hold: a PASS never touches stake; a FAIL slashes only once its window closes; an appealed FAIL
overturned by the committee slashes its verifier instead; stake unbonding meanwhile is slashed
too; the lottery follows stake."""

from __future__ import annotations

from collections import Counter

from swarmserve import native
from swarmserve.chain import Genesis, GenesisAccount, GenesisValidator, sign_transaction
from swarmserve.chain.evidence import verdict_id
from swarmserve.chain.genesis import ChainParameters
from swarmserve.chain.lottery import draw
from swarmserve.receipts import ReceiptWriter
from swarmserve.v1 import chain_pb2, common_pb2, verifier_pb2
from swarmserve.verdicts import decide_duel, sign_verdict
from tests.chainkit import Chain

VALIDATOR = native.Identity.from_seed(b"\x01" * 32)
VERIFIERS = [native.Identity.from_seed(bytes([40 + i]) * 32) for i in range(6)]
PROVIDER, OPPONENT, ROUTER = (native.Identity.from_seed(bytes([i]) * 32) for i in (50, 51, 52))
PROVIDER_NODE = native.Identity.from_seed(b"\x35" * 32)  # a second node of the provider's account
EPOCH, WINDOW = 4, 3
IDENTITIES = {i.public_key: i for i in [*VERIFIERS, PROVIDER, OPPONENT, ROUTER]}
GENESIS = Genesis(
    name="verdicts",
    created_unix_ms=1,
    validators=[GenesisValidator(key=VALIDATOR.public_key.hex(), address="127.0.0.1:7400")],
    accounts=[
        *(GenesisAccount(key=v.public_key.hex(), bonded=50) for v in VERIFIERS),
        GenesisAccount(key=PROVIDER.public_key.hex(), bonded=100, members=[PROVIDER_NODE.public_key.hex()]),
        GenesisAccount(key=OPPONENT.public_key.hex(), bonded=100),
        GenesisAccount(key=ROUTER.public_key.hex(), credits=100),
    ],
    parameters=ChainParameters(
        epoch_blocks=EPOCH,
        appeal_blocks=WINDOW,
        verifiers_per_check=2,
        appeal_committee=3,
        judges_per_duel=3,
        unbonding_blocks=100,
    ),
)
PROMPT = [1, 2, 3]
TOKENS = [(7, b"a"), (8, b"b"), (9, b"c")]


def served(request_id: str, *, cosigner: native.Identity = ROUTER) -> chain_pb2.VerdictEvidence:
    """A stream PROVIDER served and ``cosigner`` co-signed, with its prompt and tokens."""
    writer = ReceiptWriter(PROVIDER, request_id, b"\x09" * 32, PROMPT, common_pb2.SamplingParams(temperature=0.0))
    for token, text in TOKENS:
        writer.add(token, text)
    receipt = writer.sign(common_pb2.FINISH_REASON_LENGTH, common_pb2.Timing())
    receipt.cosignatures.add(signer_key=cosigner.public_key, signature=cosigner.sign(receipt.receipt))
    return chain_pb2.VerdictEvidence(
        receipt=receipt,
        prompt_token_ids=PROMPT,
        token_ids=[t for t, _ in TOKENS],
        token_texts=[x for _, x in TOKENS],
    )


class Verdicts:
    """A chain past its first epoch boundary, and nonces for every identity."""

    def __init__(self) -> None:
        self.chain = Chain(GENESIS)
        self.chain.until(EPOCH)
        self.nonces: Counter[bytes] = Counter()
        self.identities = IDENTITIES

    def submit(self, identity: native.Identity, **action: object) -> bytes:
        self.nonces[identity.public_key] += 1
        return sign_transaction(identity, self.chain.chain_id, self.nonces[identity.public_key], **action)  # type: ignore[arg-type]

    def assigned(self, evidence: chain_pb2.VerdictEvidence) -> list[native.Identity]:
        _, accounts = self.chain.state.check_assignment(verdict_id(evidence.receipt), PROVIDER.public_key)
        return [IDENTITIES[a] for a in accounts]

    def verdict(
        self,
        verifier: native.Identity,
        evidence: chain_pb2.VerdictEvidence,
        outcome: verifier_pb2.VerdictOutcome.ValueType,
        *,
        signer: native.Identity | None = None,
        epoch: int | None = None,
    ) -> bytes:
        receipt = common_pb2.Receipt.FromString(evidence.receipt.receipt)
        signed = sign_verdict(
            verifier,
            verifier_pb2.Verdict(
                kind=verifier_pb2.VERDICT_KIND_CHECK,
                subject_id=receipt.request_id,
                provider_key=receipt.node_key,
                outcome=outcome,
                score=0.2 if outcome == verifier_pb2.VERDICT_OUTCOME_FAIL else 1.0,
            ),
        )
        record = chain_pb2.RecordVerdict(
            verdict=signed,
            evidence=evidence,
            lottery_epoch=self.chain.state.epoch_of(self.chain.height) if epoch is None else epoch,
        )
        return self.submit(signer or verifier, verdict=record)

    def stake(self, identity: native.Identity) -> tuple[int, int]:
        account = self.chain.state.account(identity.public_key)
        return account.bonded, account.unbonding


FAIL, PASS = verifier_pb2.VERDICT_OUTCOME_FAIL, verifier_pb2.VERDICT_OUTCOME_PASS


def test_only_a_drawn_verifier_with_evidence_records_a_verdict_and_a_pass_never_slashes() -> None:
    v = Verdicts()
    evidence = served("r1")
    identifier = verdict_id(evidence.receipt)
    excluded = {PROVIDER.public_key}
    drawn_by_epoch_0 = IDENTITIES[v.chain.state.lottery(0, identifier, 2, excluded)[0]]
    drawn = v.assigned(evidence)
    assert len(drawn) == 2 and PROVIDER not in drawn and ROUTER not in drawn
    outsider = next(i for i in VERIFIERS if i not in drawn)
    no_stream = chain_pb2.VerdictEvidence(receipt=evidence.receipt)
    tampered = chain_pb2.VerdictEvidence()
    tampered.CopyFrom(evidence)
    tampered.token_ids[1] = 99
    wrong_prompt = chain_pb2.VerdictEvidence()
    wrong_prompt.CopyFrom(evidence)
    wrong_prompt.prompt_token_ids.append(4)
    v.chain.block(
        [
            v.verdict(outsider, evidence, FAIL),  # not drawn
            v.verdict(drawn[0], no_stream, FAIL),  # a FAIL without the stream
            v.verdict(drawn[0], tampered, FAIL),  # tokens the receipt does not commit to
            v.verdict(drawn[0], wrong_prompt, FAIL),  # a prompt it does not commit to
            v.verdict(drawn[0], evidence, FAIL, signer=drawn[1]),  # one drawn verifier's verdict, another's transaction
            v.verdict(drawn[0], evidence, FAIL, epoch=2),  # a seed to come
        ]
    )
    v.chain.until(GENESIS.parameters.lottery_epochs * EPOCH)
    v.chain.block([v.verdict(drawn_by_epoch_0, evidence, FAIL, epoch=0)])  # a stale seed
    assert v.chain.state.verdict(identifier) is None
    # The provider's own node co-signed it: a check it asked for about itself counts for nothing.
    own = served("r2", cosigner=PROVIDER_NODE)
    _, own_drawn = v.chain.state.check_assignment(verdict_id(own.receipt), PROVIDER.public_key)
    v.chain.block([v.verdict(IDENTITIES[own_drawn[0]], own, PASS)])
    assert v.chain.state.verdict(verdict_id(own.receipt)) is None
    # A drawn verifier's PASS (the receipt alone suffices) is recorded; stake is untouched.
    drawn = v.assigned(evidence)
    v.chain.block([v.verdict(drawn[0], no_stream, PASS)])
    record = v.chain.state.verdict(identifier)
    assert record is not None and record.status == "passed" and record.verifier == drawn[0].public_key
    v.chain.block([v.verdict(drawn[1], evidence, FAIL)])  # one verdict per receipt
    v.chain.until(v.chain.height + WINDOW + 2)
    assert v.chain.state.verdict(identifier) == record
    assert v.stake(PROVIDER) == (100, 0)
    assert len(v.chain.roots()) == 1


def test_a_fail_slashes_only_after_its_window_and_stays_decided() -> None:
    v = Verdicts()
    evidence = served("r1")
    identifier = verdict_id(evidence.receipt)
    verifier = v.assigned(evidence)[0]
    v.chain.block([v.verdict(verifier, evidence, FAIL)])
    record = v.chain.state.verdict(identifier)
    assert record is not None and record.status == "pending"
    v.chain.until(record.deadline)
    assert v.stake(PROVIDER) == (100, 0)  # not before the decision
    v.chain.block([])
    decided = v.chain.state.verdict(identifier)
    assert decided is not None and decided.status == "failed" and v.stake(PROVIDER) == (50, 0)
    v.chain.block([v.submit(PROVIDER, appeal=chain_pb2.AppealVerdict(verdict_id=identifier))])  # too late
    v.chain.until(v.chain.height + 2 * WINDOW)
    assert v.chain.state.verdict(identifier) == decided and v.stake(PROVIDER) == (50, 0)  # slashed once
    assert len(v.chain.roots()) == 1


def test_a_false_fail_is_appealed_overturned_and_its_author_slashed() -> None:
    v = Verdicts()
    evidence = served("r1")
    identifier = verdict_id(evidence.receipt)
    liar = v.assigned(evidence)[0]
    liar_stake = v.stake(liar)[0]
    v.chain.block([v.verdict(liar, evidence, FAIL)])
    # Only the accused's account may appeal (here through its other node).
    v.chain.block([v.submit(OPPONENT, appeal=chain_pb2.AppealVerdict(verdict_id=identifier))])
    assert v.chain.state.verdict(identifier).status == "pending"  # type: ignore[union-attr]
    v.chain.block([v.submit(PROVIDER_NODE, appeal=chain_pb2.AppealVerdict(verdict_id=identifier))])
    jurors = v.chain.state.jurors(identifier)
    assert len(jurors) == 3 and not {liar.public_key, PROVIDER.public_key, ROUTER.public_key} & jurors.keys()
    first, second, third = (IDENTITIES[j] for j in sorted(jurors))
    outsider = next(i for i in VERIFIERS if i.public_key not in jurors and i != liar)
    vote = chain_pb2.AppealVote
    v.chain.block(
        [
            v.submit(first, appeal_vote=vote(verdict_id=identifier, uphold=False)),
            v.submit(first, appeal_vote=vote(verdict_id=identifier, uphold=True)),  # a second vote
            v.submit(outsider, appeal_vote=vote(verdict_id=identifier, uphold=True)),  # not a juror
            v.submit(liar, appeal_vote=vote(verdict_id=identifier, uphold=True)),  # the accuser
            v.submit(second, appeal_vote=vote(verdict_id=identifier, uphold=False)),
            v.submit(third, appeal_vote=vote(verdict_id=identifier, uphold=True)),
        ]
    )
    assert v.chain.state.jurors(identifier) == {
        first.public_key: False,
        second.public_key: False,
        third.public_key: True,
    }
    v.chain.until(v.chain.state.verdict(identifier).deadline + 1)  # type: ignore[union-attr]
    assert v.chain.state.verdict(identifier).status == "overturned"  # type: ignore[union-attr]
    assert v.stake(PROVIDER) == (100, 0) and v.stake(liar) == (liar_stake // 2, 0)
    assert len(v.chain.roots()) == 1


def test_an_upheld_fail_also_slashes_stake_that_is_unbonding() -> None:
    v = Verdicts()
    evidence = served("r1")
    identifier = verdict_id(evidence.receipt)
    v.chain.block([v.verdict(v.assigned(evidence)[0], evidence, FAIL)])
    v.chain.block(
        [
            v.submit(PROVIDER, unbond=chain_pb2.UnbondStake(credits=60)),  # trying to escape the slash
            v.submit(PROVIDER, appeal=chain_pb2.AppealVerdict(verdict_id=identifier)),
        ]
    )
    assert v.stake(PROVIDER) == (40, 60)
    jurors = [IDENTITIES[j] for j in v.chain.state.jurors(identifier)]
    v.chain.block(
        [v.submit(j, appeal_vote=chain_pb2.AppealVote(verdict_id=identifier, uphold=True)) for j in jurors[:2]]
    )
    v.chain.until(v.chain.state.verdict(identifier).deadline + 1)  # type: ignore[union-attr]
    assert v.chain.state.verdict(identifier).status == "failed"  # type: ignore[union-attr]
    assert v.stake(PROVIDER) == (20, 30)


def duel_votes(
    judges: list[native.Identity], winner: native.Identity, loser: native.Identity
) -> list[verifier_pb2.SignedVerdict]:
    return [
        sign_verdict(
            judge,
            verifier_pb2.Verdict(
                kind=verifier_pb2.VERDICT_KIND_DUEL,
                subject_id="duel-1",
                provider_key=winner.public_key,
                opponent_key=loser.public_key,
                outcome=PASS,
                score=0.9,
            ),
        )
        for judge in judges
    ]


def test_a_duel_counts_only_when_judged_by_the_drawn_judges() -> None:
    v = Verdicts()
    state = v.chain.state
    epoch = state.epoch_of(v.chain.height)
    parties = {PROVIDER.public_key, OPPONENT.public_key, ROUTER.public_key}
    judges = [
        IDENTITIES[a] for a in state.lottery(epoch, b"duel" + ROUTER.public_key + (0).to_bytes(8, "big"), 3, parties)
    ]
    outsider = next(i for i in VERIFIERS if i not in judges)

    def result(voters: list[native.Identity]) -> chain_pb2.RecordDuel:
        decided = decide_duel("duel-1", duel_votes(voters, OPPONENT, PROVIDER))
        assert decided is not None
        return chain_pb2.RecordDuel(result=sign_verdict(ROUTER, decided), lottery_epoch=epoch)

    v.chain.block([v.submit(ROUTER, duel=result([*judges[:2], outsider]))])
    assert state.duels_organised(ROUTER.public_key) == 0 and v.stake(PROVIDER) == (100, 0)
    v.chain.block([v.submit(OPPONENT, duel=result(judges))])  # anyone may submit the organiser's result
    assert state.duels_organised(ROUTER.public_key) == 1 and v.stake(PROVIDER) == (90, 0)
    assert v.stake(OPPONENT) == (100, 0)
    # The same judges again: the organiser's next duel has another draw.
    v.chain.block([v.submit(ROUTER, duel=result(judges))])
    next_judges = state.lottery(epoch, b"duel" + ROUTER.public_key + (1).to_bytes(8, "big"), 3, parties)
    assert v.stake(PROVIDER) == ((81, 0) if set(next_judges) == {j.public_key for j in judges} else (90, 0))


def test_the_lottery_follows_stake_and_nothing_else() -> None:
    stakes = {b"a" * 32: 30, b"b" * 32: 10, b"c" * 32: 0}
    picks = Counter(draw(b"seed", i.to_bytes(4, "big"), stakes, 1)[0] for i in range(4000))
    assert picks[b"c" * 32] == 0  # no stake, never drawn
    assert 2850 <= picks[b"a" * 32] <= 3150, picks  # 3:1 (expected 3000, sd 27)
    assert draw(b"seed", b"x", stakes, 1) == draw(b"seed", b"x", dict(reversed(stakes.items())), 1)
    assert sorted(draw(b"seed", b"x", stakes, 5)) == [b"a" * 32, b"b" * 32]  # without replacement
    assert draw(b"seed", b"x", stakes, 2, excluded={b"a" * 32}) == [b"b" * 32]
