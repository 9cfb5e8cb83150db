"""Issue 14, attack 2: telling checks from users, and cheating only on users.

The detector (``services/verifier/adversaries.py: check_score``) is the strongest we could build
from the public source and from what a provider sees of a request: the (retired) challenge
templates and topics, their one-message shape, length and temperatures, explicit seeds, and the
duel's old request-id suffix. It is scored on what providers are sent (``forward_request``, the
router's one path) for ordinary user requests and for each kind of check; AUC is the
probability that a check scores above a user request (ties count half).

- Duel copies (a user's own request sent to a second provider and judged): before, their id
  ended in "-b" (AUC 0.88: users who happen to ask template-like questions score high too); now
  every forwarded request gets a fresh random id and a seed, and a duel copy is indistinguishable
  from a user's request (AUC 0.5).
- Audits (a consenting user's request re-executed by a verifier after it was served): the
  provider is sent exactly the bytes it would be sent without the consent (AUC 0.5).
- The template challenges verifiers used to send were recognisable (AUC near 1.0): a provider
  could serve them honestly and cheat everyone else, so they were retired.
- A provider that serves the claimed model to what the detector takes for a check and random
  tokens to everyone else (a real swarm with the ledger, duels at rate 1): it serves template
  prompts honestly, but the duels over users' requests convict it at the first one.
"""

from __future__ import annotations

import random
import uuid

from services.router.config import DuelSettings
from services.router.duels import duel_copy
from services.router.service import forward_request
from services.verifier.adversaries import ChallengeAwareEngine, Seen, challenge_request, check_score
from swarmserve.v1 import common_pb2, inference_pb2, router_pb2
from swarmserve.verdicts import tally_duel
from tests.conftest import MODEL, SwarmFactory
from tests.test_private_path import chat_request, run
from tests.test_trust import REFERENCE, duel_results, eventually, staked_as_seen_by, swap_engine

USER_PROMPTS = [
    "What is the capital of France?", "Can you help me write an email to my landlord about a broken heater?",
    "Translate 'good morning' into Spanish and German.", "Why is the sky blue?",
    "Summarize the plot of Hamlet in three sentences.", "Write a haiku about autumn rain.",
    "How do I reverse a list in Python?", "Explain the difference between TCP and UDP.",
    "Give me a recipe for pancakes without eggs.", "What are good names for a golden retriever puppy?",
    "Is it safe to eat raw cookie dough?", "Write a short story about a lighthouse keeper.",
    "How many minutes are in a week?", "Explain photosynthesis to a curious child.",
    "What should a beginner know about chess openings?", "Fix this SQL: SELECT * FORM users",
    "List three facts about volcanoes.", "Draft a polite reminder for an unpaid invoice.",
]  # fmt: skip


def user_request(rng: random.Random, i: int) -> router_pb2.GenerateRequest:
    """Ordinary traffic as clients send it: one or several turns, a system prompt or not,
    sampling left to defaults or set as OpenAI-style clients do, a seed now and then."""
    request = router_pb2.GenerateRequest(model=MODEL)
    if rng.random() < 0.3:
        request.chat.messages.add(role=common_pb2.CHAT_ROLE_SYSTEM, content="You are a helpful assistant.")
    if rng.random() < 0.2:
        request.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=rng.choice(USER_PROMPTS))
        request.chat.messages.add(role=common_pb2.CHAT_ROLE_ASSISTANT, content="Sure.")
    request.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=USER_PROMPTS[i % len(USER_PROMPTS)])
    sampling = request.sampling
    sampling.max_new_tokens = rng.choice([0, 32, 64, 128, 256, 512])
    sampling.temperature = rng.choice([0.0, 0.2, 0.7, 0.7, 1.0, 1.0])
    sampling.top_p = rng.choice([0.0, 1.0, 0.9, 0.95])
    if rng.random() < 0.1:
        sampling.stop.append("\n\n")
    if rng.random() < 0.2:
        sampling.seed = rng.getrandbits(63)
    if rng.random() < 0.5:
        request.request_id = f"client-{i}"
    return request


def auc(checks: list[float], users: list[float]) -> float:
    wins = sum((c > u) + 0.5 * (c == u) for c in checks for u in users)
    return wins / (len(checks) * len(users))


def seen(request: inference_pb2.InferenceGenerateRequest) -> float:
    return check_score(Seen.of(request))


def consenting(request: router_pb2.GenerateRequest) -> router_pb2.GenerateRequest:
    audited = router_pb2.GenerateRequest()
    audited.CopyFrom(request)
    audited.privacy.allow_audit = True
    return audited


def test_the_provider_is_sent_the_same_bytes_whether_or_not_the_user_consents_to_audits() -> None:
    for i, request in enumerate(user_request(random.Random(5), i) for i in range(50)):
        asked = forward_request(request, random.Random(i), 2).SerializeToString()
        assert forward_request(consenting(request), random.Random(i), 2).SerializeToString() == asked


def test_duel_copies_and_audits_cannot_be_told_from_users_and_template_challenges_can() -> None:
    rng = random.Random(2026)
    users = [user_request(rng, i) for i in range(400)]
    user_scores = [seen(forward_request(u, rng, 0)) for u in users]
    duels = [seen(forward_request(duel_copy(u, uuid.uuid4().hex), rng, 0)) for u in users[:200]]
    audits = [seen(forward_request(consenting(u), rng, 0)) for u in rng.sample(users, 200)]
    challenges = [seen(forward_request(challenge_request(MODEL, rng), rng, 0)) for _ in range(200)]

    # Before: the router forwarded the client's id (the duel's "<id>-b") and no seed of its own.
    def forwarded_before(request: router_pb2.GenerateRequest) -> inference_pb2.InferenceGenerateRequest:
        forwarded = forward_request(request, rng, 0)
        forwarded.request_id = request.request_id or uuid.uuid4().hex
        if not request.sampling.HasField("seed"):
            forwarded.sampling.ClearField("seed")
        return forwarded

    before_users = [seen(forwarded_before(u)) for u in users]
    before_duels = [seen(forwarded_before(duel_copy(u, uuid.uuid4().hex + "-b"))) for u in users[:200]]
    figures = {
        "duel copies, now": auc(duels, user_scores),
        "duel copies, before": auc(before_duels, before_users),
        "audits": auc(audits, user_scores),
        "template challenges (retired)": auc(challenges, user_scores),
    }
    print(figures)
    assert abs(figures["duel copies, now"] - 0.5) <= 0.05, figures
    assert abs(figures["audits"] - 0.5) <= 0.05, figures
    assert figures["duel copies, before"] >= 0.8, figures
    assert figures["template challenges (retired)"] >= 0.95, figures  # why they were retired


async def test_a_provider_that_cheats_only_on_users_is_convicted_by_a_duel(swarm: SwarmFactory) -> None:
    nodes = [{}, {}, {"models": REFERENCE}, {"models": REFERENCE}, {"models": REFERENCE}]
    async with swarm(relays=1, inference=nodes, default_hops=1, duels=DuelSettings(rate=1.0), ledger=True) as s:
        honest, cheater, *_ = s.inference
        claimed = cheater.servicer.service.engines[MODEL].identity  # type: ignore[union-attr]
        swap_engine(cheater, ChallengeAwareEngine, claimed)
        engine = cheater.servicer.service.engines[MODEL]  # type: ignore[union-attr]
        assert isinstance(engine, ChallengeAwareEngine)
        await eventually(lambda: staked_as_seen_by(s.router, cheater) == 50, "the cheater's stake reached the router")
        # Template challenges, as verifiers used to send them: the cheater takes them for checks
        # and serves the real model (so such challenges alone would never catch it).
        rng = random.Random(7)
        while engine.served_honestly == 0:
            await run(s.router.address, challenge_request(MODEL, rng, max_new_tokens=8))
            await eventually(lambda: not s.router.service.duels._running, "the duel finished", timeout_s=60)
        # Users' requests: it cheats on them, and a duel over one convicts it.
        for i in range(6):
            await run(s.router.address, chat_request(USER_PROMPTS[i], max_new_tokens=16))
            await eventually(lambda: not s.router.service.duels._running, "the duel finished", timeout_s=60)
            if engine.cheated and staked_as_seen_by(s.router, cheater) < 50:
                break
        cheater_key = cheater.keys.identity.public_key
        lost = [r for r in duel_results(s.router) if tally_duel(r).loser == cheater_key]
        assert engine.cheated > 0 and lost, "the cheater was not convicted by a duel over a user's request"
        assert tally_duel(lost[0]).winner == honest.keys.identity.public_key
        assert staked_as_seen_by(s.router, cheater) < 50
