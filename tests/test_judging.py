"""How a judge votes in a duel (``services/verifier/judging.py``), with real nodes and the real
model: two providers serve one chat over gRPC, a third node judges through ``Verifier.Judge``.

Tried: two honest providers sampling at temperature 1.0 with different seeds (their answers
differ and one is always likelier: a likelihood vote would take stake from an honest node at
random; the replay leaves it undecided); a provider serving random tokens under the real model's
digest, shown first and shown second (it loses by the replay, whatever the order); a Q2_K
re-quantization claiming the real model, greedy (it loses)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from grpc import aio

from services.inference.config import ModelSettings
from services.inference.node import InferenceNode
from services.verifier.adversaries import ClaimingEngine, RandomTokensEngine
from services.verifier.judging import REPLAY_METHOD
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from swarmserve.verdicts import open_verdict
from tests.conftest import MODEL, NodeFactory
from tests.test_trust import swap_engine

PROMPTS = ["Write one sentence about the sea.", "Name a famous painter.", "Why is the sky blue?"]
UNDECIDED, DECIDED = verifier_pb2.VERDICT_OUTCOME_INCONCLUSIVE, verifier_pb2.VERDICT_OUTCOME_PASS


def chat(text: str) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=text)])


async def answer(node: InferenceNode, text: str, **sampling: object) -> verifier_pb2.DuelAnswer:
    async with aio.insecure_channel(node.address) as channel:
        request = inference_pb2.InferenceGenerateRequest(
            model=MODEL,
            chat=chat(text),
            sampling=common_pb2.SamplingParams(max_new_tokens=24, **sampling),  # type: ignore[arg-type]
        )
        served = verifier_pb2.DuelAnswer()
        async for reply in inference_pb2_grpc.InferenceStub(channel).Generate(request):
            if reply.HasField("token"):
                served.token_ids.append(reply.token.token_id)
                served.token_texts.append(reply.token.text)
            else:
                served.receipt.CopyFrom(reply.summary.receipt)
        return served


async def vote(
    judge: InferenceNode, text: str, first: verifier_pb2.DuelAnswer, second: verifier_pb2.DuelAnswer
) -> verifier_pb2.Verdict:
    async with aio.insecure_channel(judge.address) as channel:
        ask = verifier_pb2.JudgeRequest(duel_id="d", chat=chat(text), first=first, second=second)
        return open_verdict(await verifier_pb2_grpc.VerifierStub(channel).Judge(ask))


async def start(
    stack: AsyncExitStack, inference_node: NodeFactory, tmp_path: Path, name: str, **kw: object
) -> InferenceNode:
    return await stack.enter_async_context(inference_node(data_dir=tmp_path / name, **kw))


async def test_honest_answers_tie_and_the_side_that_fails_replay_loses(
    inference_node: NodeFactory, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        judge, one, other = [await start(stack, inference_node, tmp_path, name) for name in ("judge", "one", "other")]
        for index, text in enumerate(PROMPTS):
            first = await answer(one, text, temperature=1.0, seed=index)
            second = await answer(other, text, temperature=1.0, seed=1000 + index)
            assert list(first.token_ids) != list(second.token_ids)  # two honest, different answers
            verdict = await vote(judge, text, first, second)
            assert verdict.outcome == UNDECIDED and verdict.method == REPLAY_METHOD, (text, verdict)

        claimed = one.servicer.service.engines[MODEL].identity  # type: ignore[union-attr]
        swap_engine(other, RandomTokensEngine, claimed)
        honest_key, cheater_key = one.keys.identity.public_key, other.keys.identity.public_key
        for index, text in enumerate(PROMPTS[:2]):
            honest = await answer(one, text, temperature=0.7, seed=index)
            cheat = await answer(other, text, temperature=0.7, seed=index)
            for shown in ((honest, cheat), (cheat, honest)):
                verdict = await vote(judge, text, *shown)
                assert verdict.outcome == DECIDED, verdict
                assert (verdict.provider_key, verdict.opponent_key) == (honest_key, cheater_key)
                assert verdict.score > 0.99 and verdict.method == REPLAY_METHOD


async def test_a_requantized_model_loses_a_greedy_duel(
    inference_node: NodeFactory, tmp_path: Path, q2k_model: Path
) -> None:
    async with AsyncExitStack() as stack:
        judge, honest = [await start(stack, inference_node, tmp_path, name) for name in ("judge", "honest")]
        q2k = [ModelSettings(name=MODEL, path=q2k_model, context_length=1024)]
        cheater = await start(stack, inference_node, tmp_path, "q2k", models=q2k)
        swap_engine(cheater, ClaimingEngine, honest.servicer.service.engines[MODEL].identity)  # type: ignore[union-attr]
        text = PROMPTS[0]
        verdict = await vote(judge, text, await answer(cheater, text), await answer(honest, text))
        assert verdict.outcome == DECIDED and verdict.provider_key == honest.keys.identity.public_key, verdict
