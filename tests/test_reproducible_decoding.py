"""Same request, same tokens (services/inference/schedule.py): real llama.cpp nodes over real
sockets, greedy and seeded T=0.7 requests of several prompts and lengths, repeated, after a
different request, after requests sharing a prefix (longer and shorter), on every slot, beside
three other streams, on another node with another slot and thread count, and continued from
their first k tokens for several k. Every comparison is of token ids and of the reported
log-probabilities bit for bit: a position computed in another batch shape moves the logits
even where no token flips (up to a whole logit on the embedded model).

Tried with the rule broken, on an Intel Xeon (AVX-512) with llama-cpp-python 0.3.36:
reusing the longest cached prefix and evaluating the rest in one batch (the engine before this
rule) failed the resume test and the shared-prefix test; evaluating the served tokens of a
continued stream in one batch failed the resume test; cached positions kept past a chunk
boundary failed the shared-prefix test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from services.inference.config import ModelSettings, ProviderPolicy
from services.inference.engine import ChatTurn, Sampling
from services.inference.llama_engine import LlamaCppEngine
from services.inference.models import default_model_path
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.conftest import MODEL, NodeFactory
from tests.test_inference_node import collect

_ROLES = {"user": common_pb2.CHAT_ROLE_USER, "assistant": common_pb2.CHAT_ROLE_ASSISTANT}
GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 0.7, "seed": 11}


@dataclass(frozen=True)
class Case:
    turns: tuple[tuple[str, str], ...]
    max_new_tokens: int
    sampling: dict[str, float]

    def request(
        self, extra_turns: Sequence[tuple[str, str]] = (), max_new_tokens: int | None = None
    ) -> inference_pb2.InferenceGenerateRequest:
        messages = [
            common_pb2.ChatMessage(role=_ROLES[role], content=text) for role, text in (*self.turns, *extra_turns)
        ]
        return inference_pb2.InferenceGenerateRequest(
            model=MODEL,
            chat=common_pb2.ChatMessages(messages=messages),
            sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens or self.max_new_tokens, **self.sampling),  # type: ignore[arg-type]
        )

    def turns_as_engine_sees_them(self) -> list[ChatTurn]:
        return [ChatTurn(role, text) for role, text in self.turns]


# Prompts of one, two and three prefill chunks (about 30, 50 and 100 tokens with the template).
PROMPTS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "What is the capital of France?"),),
    (("user", "Write two sentences about the sea, the wind, and the sailors who cross them at night."),),
    (
        ("user", "List three prime numbers and say how you would check that a number is prime."),
        ("assistant", "2, 3 and 5. To check a number, try dividing it by every prime up to its square root."),
        ("user", "Now explain, one line each, why 2, 3 and 5 pass that check."),
    ),
)
CASES = [
    Case(turns, length, sampling)
    for turns, length in zip(PROMPTS, (24, 40, 56), strict=True)
    for sampling in (GREEDY, SAMPLED)
]
# A request whose prompt extends a case's prompt (a follow-up turn), and one whose prompt is a
# strict prefix of the three-turn case's: both share cached positions with the case.
FOLLOW_UP = (("assistant", "Sure."), ("user", "Say it again, in French this time, please."))


Stream = list[tuple[int, float]]


def stream_of(tokens: Sequence[inference_pb2.InferenceToken]) -> Stream:
    return [(t.token_id, t.logprob) for t in tokens]


async def run(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.InferenceGenerateRequest) -> Stream:
    tokens, _ = await collect(stub, request)
    return stream_of(tokens)


def describe(case: Case) -> str:
    return f"{case.turns[-1][1][:30]!r} x{len(case.turns)}, {case.sampling}, {case.max_new_tokens} tokens"


async def test_same_request_same_tokens_whatever_the_cache_held(inference_node: NodeFactory) -> None:
    async with inference_node() as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reference = [await run(stub, case.request()) for case in CASES]  # each after a different one
        assert all(len(stream) >= 8 for stream in reference), "every case answers at some length"
        assert reference[0] != reference[1], "greedy and T=0.7 differ, so both are tried"

        for case, expected in zip(CASES, reference, strict=True):
            assert await run(stub, case.request()) == expected, f"repeated at once: {describe(case)}"
            await run(stub, case.request(FOLLOW_UP, max_new_tokens=4))  # caches the case's prompt and more
            assert await run(stub, case.request()) == expected, f"after a longer prompt sharing it: {describe(case)}"
        for case, expected in zip(CASES[4:], reference[4:], strict=True):  # the three-turn cases
            shorter = Case(case.turns[:1], 4, case.sampling)
            await run(stub, shorter.request())  # caches the first turn: a strict prefix of the case
            assert await run(stub, case.request()) == expected, f"after a shorter prompt it extends: {describe(case)}"
        for case, expected in reversed(list(zip(CASES, reference, strict=True))):
            assert await run(stub, case.request()) == expected, f"after a different request: {describe(case)}"


async def test_same_tokens_on_every_slot_beside_other_streams_and_on_another_node(
    inference_node: NodeFactory, tmp_path: Path
) -> None:
    # One node with one slot and all cores, one with four slots decoding together on one thread:
    # another node of the same build and CPU kind, with another slot count and thread count.
    one_slot = inference_node(data_dir=tmp_path / "one")
    four_slots = inference_node(
        data_dir=tmp_path / "four",
        policy=ProviderPolicy(max_concurrent=4, max_queue=8, max_new_tokens=256, default_new_tokens=16),
        models=[ModelSettings(name=MODEL, context_length=1024, threads=1)],
    )
    async with (
        one_slot as first,
        four_slots as second,
        aio.insecure_channel(first.address) as first_channel,
        aio.insecure_channel(second.address) as second_channel,
    ):
        reference = [await run(inference_pb2_grpc.InferenceStub(first_channel), case.request()) for case in CASES]
        stub = inference_pb2_grpc.InferenceStub(second_channel)
        # Four copies of one request at once hold all four slots.
        for index in (0, 5):
            copies = await asyncio.gather(*(run(stub, CASES[index].request()) for _ in range(4)))
            assert copies == [reference[index]] * 4, f"on each of four slots: {describe(CASES[index])}"
        # Every case beside three other streams (different requests, running at the same time).
        for start in range(0, len(CASES), 2):
            together = [(start + offset) % len(CASES) for offset in range(4)]
            answers = await asyncio.gather(*(run(stub, CASES[i].request()) for i in together))
            for i, answer in zip(together, answers, strict=True):
                assert answer == reference[i], f"beside three other streams, on another node: {describe(CASES[i])}"


async def generate(engine: LlamaCppEngine, prompt: list[int], sampling: Sampling, resume: Sequence[int] = ()) -> Stream:
    return [(t.token_id, t.logprob) async for t in engine.generate(prompt, sampling, resume)]


async def test_a_stream_continued_from_its_first_k_tokens_continues_exactly() -> None:
    model = default_model_path()
    serving = LlamaCppEngine(model, MODEL, context_length=1024)
    fresh = LlamaCppEngine(model, MODEL, context_length=1024)
    try:
        for case in CASES:
            prompt = serving.tokenize(serving.apply_chat_template(case.turns_as_engine_sees_them()))
            sampling = Sampling(
                max_new_tokens=case.max_new_tokens,
                seed=int(case.sampling.get("seed", 0)),
                temperature=case.sampling["temperature"],
            )
            full = await generate(serving, prompt, sampling)
            ids = [token for token, _ in full]
            assert len(full) >= 8, describe(case)
            # On one engine, each continuation starts from a context holding another request
            # (the first k of each case) or another prefix of the same stream, longer or shorter.
            for k in (1, len(full) // 2, len(full) - 1, 5):
                assert await generate(fresh, prompt, sampling, ids[:k]) == full[k:], (
                    f"continued after {k}: {describe(case)}"
                )
            # On the node that served it (its context still holds the whole stream).
            assert await generate(serving, prompt, sampling, ids[:3]) == full[3:], (
                f"continued where it was served: {describe(case)}"
            )
            assert await generate(serving, prompt, sampling, ids[: case.max_new_tokens]) == full[case.max_new_tokens :]
    finally:
        await serving.close()
        await fresh.close()
