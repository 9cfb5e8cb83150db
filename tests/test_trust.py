"""Duel-and-judge and audits with stake on the ledger's chain, in a real swarm on loopback:
a router, relays (validating with the router) and llama.cpp inference nodes with the real model.

Tried: a provider serving random tokens dueling an honest one, judged by the judges the chain
drew, two honest and one that always votes for the cheater (the cheater loses every duel and
stake, the colluding judge loses its trust, the chain replays clean); a re-quantized (Q2_K)
provider claiming the real model, serving users who consent to audits (and two who do not,
whose prompts no verifier sees): a drawn verifier re-executes each consenting request's answer
and the FAIL is recorded with its evidence, the cheater's automatic appeal goes to a
committee that re-executes and upholds it, and only then is it slashed and dropped from
dispatch, for good."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from services.inference.config import ModelSettings
from services.inference.node import InferenceNode
from services.router.config import AuditSettings, DuelSettings
from services.router.node import RouterNode
from services.verifier.adversaries import BiasedJudge, ClaimingEngine, RandomTokensEngine
from swarmserve.chain.audit import audit_replica
from swarmserve.chain.evidence import verdict_id
from swarmserve.v1 import common_pb2, router_pb2, verifier_pb2
from swarmserve.verdicts import tally_duel
from tests.conftest import MODEL, SwarmFactory
from tests.test_private_path import chat_request, run

PASS, FAIL = verifier_pb2.VERDICT_OUTCOME_PASS, verifier_pb2.VERDICT_OUTCOME_FAIL
PROMPTS = ["What is the capital of France?", "Name a famous painter.", "Why is the sky blue?", "List three colours."]
REFERENCE = [ModelSettings(name="reference-copy", context_length=1024)]  # the same weights under another name:
# verifiers that hold the model but get no user traffic (the router dispatches by name)


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def staked_as_seen_by(router: RouterNode, node: InferenceNode) -> int:
    assert router.chain is not None
    return router.chain.state.account(node.keys.identity.public_key).bonded


def duel_results(router: RouterNode) -> list[verifier_pb2.Verdict]:
    assert router.chain is not None
    _, events = router.chain.state.reputation_events(0)
    return [e for e in events if isinstance(e, verifier_pb2.Verdict)]


def swap_engine(node: InferenceNode, make: Callable[..., object], *args: object) -> None:
    service = node.servicer.service
    assert service is not None
    inner = service.engines[MODEL]
    service.engines[MODEL] = make(inner, *args)  # type: ignore[assignment]


async def test_duels_reward_the_honest_provider_and_expose_a_judge_voting_for_one_side(swarm: SwarmFactory) -> None:
    nodes = [{}, {}, {"models": REFERENCE}, {"models": REFERENCE}, {"models": REFERENCE}]
    async with swarm(relays=1, inference=nodes, default_hops=1, duels=DuelSettings(rate=1.0), ledger=True) as s:
        honest, cheater, *judges = s.inference
        cheater_engine = cheater.servicer.service.engines[MODEL]  # type: ignore[union-attr]
        swap_engine(cheater, RandomTokensEngine, cheater_engine.identity)
        colluder = judges[2]
        cheater_key = cheater.keys.identity.public_key
        colluder.verifier.service = BiasedJudge(
            colluder.keys.identity,
            lambda: colluder.servicer.service.engines,  # type: ignore[union-attr]
            colluder.trust.book,
            favour=BiasedJudge.always_for(cheater_key),
        )
        await eventually(lambda: staked_as_seen_by(s.router, cheater) == 50, "the cheater's stake reached the router")
        for prompt in PROMPTS:
            await run(s.router.address, chat_request(prompt, max_new_tokens=16))
            await eventually(lambda: not s.router.service.duels._running, "the duel finished", timeout_s=60)

        results = duel_results(s.router)
        assert len(results) == len(PROMPTS)  # every request dueled, every duel decided
        honest_key, colluder_key = honest.keys.identity.public_key, colluder.keys.identity.public_key
        for result in results:
            tally = tally_duel(result)
            assert (tally.winner, tally.loser) == (honest_key, cheater_key)
            assert len(tally.judges_agreeing) == 2
        # The colluding judge voted against the majority in the first duel, lost its trust, and
        # was not drawn again.
        assert colluder_key in tally_duel(results[0]).judges_dissenting
        assert all(colluder_key not in tally_duel(r).judges_dissenting for r in results[1:])
        book = s.router.trust.book()
        assert not book.standing(colluder_key).trusted
        assert book.standing(honest_key).score > book.standing(cheater_key).score
        assert all(book.standing(j.keys.identity.public_key).trusted for j in judges[:2])
        # Each lost duel burned 10% of the cheater's stake (rounded up): 50 -> 45 -> 40 -> 36 -> 32.
        assert staked_as_seen_by(s.router, cheater) == 32
        assert staked_as_seen_by(s.router, honest) == 50
        assert s.router.chain is not None and audit_replica(s.router.chain.state).problems == []


async def test_audits_of_consenting_requests_catch_a_requantized_model(swarm: SwarmFactory, q2k_model: Path) -> None:
    nodes = [{}, {"models": [ModelSettings(name=MODEL, path=q2k_model, context_length=1024)]}, {"models": REFERENCE}]
    # Round-robin: the router's choice of provider alternates, so both serve consenting users
    # (with observed latency, the faster provider would take nearly all of them).
    async with swarm(
        relays=2,
        inference=nodes,
        default_hops=2,
        dispatch="round-robin",
        ledger=True,
        audits=AuditSettings(rate=1.0),
    ) as s:
        honest, cheater, _ = s.inference
        claimed = honest.servicer.service.engines[MODEL].identity  # type: ignore[union-attr]
        swap_engine(cheater, ClaimingEngine, claimed)  # Q2_K weights, signing as the Q4_1 model
        chain = s.router.chain
        assert chain is not None
        cheater_key, honest_key = cheater.keys.identity.public_key, honest.keys.identity.public_key
        await eventually(lambda: bool(chain.state.check_assignment(b"x", cheater_key)[1]), "the lottery has stakes")

        def recorded(summary: router_pb2.GenerateSummary) -> bool:
            return chain.state.verdict(verdict_id(summary.receipt)) is not None

        # Without consent nobody but the provider sees the prompt: no audit.
        unaudited = [(await run(s.router.address, chat_request(p, max_new_tokens=8)))[1] for p in PROMPTS[:2]]
        # With consent, every request is audited (rate 1): the cheater's greedy answers fail.
        audited: dict[bytes, list[router_pb2.GenerateSummary]] = {cheater_key: [], honest_key: []}
        for prompt in PROMPTS * 2:
            request = chat_request(prompt, max_new_tokens=16)
            request.privacy.allow_audit = True
            _, summary = await run(s.router.address, request)
            audited[common_pb2.Receipt.FromString(summary.receipt.receipt).node_key].append(summary)
            if audited[cheater_key] and audited[honest_key]:
                break
        await eventually(
            lambda: all(recorded(summary) for summary in (*audited[cheater_key], *audited[honest_key])),
            "every consenting request's audit was recorded",
            timeout_s=120,
        )
        assert not any(recorded(summary) for summary in unaudited)

        def outcomes(key: bytes) -> set[str]:
            return {chain.state.verdict(verdict_id(summary.receipt)).status for summary in audited[key]}  # type: ignore[union-attr]

        assert "passed" not in outcomes(cheater_key), outcomes(cheater_key)
        # The honest node's audits pass, unless the lottery drew the cheater to audit it: its
        # cheap weights FAIL the honest answer, the honest node appeals, the committee overturns.
        await eventually(
            lambda: outcomes(honest_key) <= {"passed", "overturned"},
            "the honest node's audits passed or were overturned on appeal",
            timeout_s=120,
        )

        # The FAIL is on the chain with its evidence, the cheater appealed, the committee (the
        # honest node, re-executing) upheld it: decided, it slashes half the stake and convicts
        # the cheater, and from then on the router sends it nothing.
        assert s.router.chain is not None
        await eventually(
            lambda: not s.router.trust.book().standing(cheater_key).trusted,
            "the failed check was decided",
            timeout_s=60,
        )
        assert s.router.trust.book().standing(cheater_key).convicted
        assert staked_as_seen_by(s.router, cheater) <= 25
        assert staked_as_seen_by(s.router, honest) == 50
        for prompt in PROMPTS[:2]:
            _, summary = await run(s.router.address, chat_request(prompt, max_new_tokens=8))
            assert summary.served_by == honest.keys.identity.node_id
