"""Re-execution checks with real nodes and the real model: a provider serves over gRPC, a
verifier (another inference node, holding its own copy of the model) re-runs the stream and signs
a verdict. Tried: an honest provider over many greedy and sampled requests; a Q2_K
re-quantization claiming to be the Q4_1 model; random tokens; an answer replayed from another
prompt; an early stop; and broken evidence (tampered tokens, the wrong prompt, a forged receipt,
a model the verifier does not hold, token ids outside the vocabulary)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.inference.config import ModelSettings
from services.inference.engine import ChatTurn, Engine, ModelIdentity
from services.inference.node import InferenceNode
from services.verifier.adversaries import ClaimingEngine, EarlyStopEngine, RandomTokensEngine, ReplayingEngine
from swarmserve import native
from swarmserve.receipts import ReceiptWriter
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from swarmserve.verdicts import open_verdict
from tests.conftest import MODEL, NodeFactory

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis briefly.",
    "Name a famous painter.",
    "Why is the sky blue?",
]
PASS, FAIL = verifier_pb2.VERDICT_OUTCOME_PASS, verifier_pb2.VERDICT_OUTCOME_FAIL


@dataclass
class Swarmlet:
    provider: InferenceNode
    verifier: InferenceNode
    provider_stub: inference_pb2_grpc.InferenceStub
    verifier_stub: verifier_pb2_grpc.VerifierStub

    def prompt_ids(self, text: str) -> list[int]:
        engine = self.verifier.servicer.service.engines[MODEL]  # type: ignore[union-attr]
        return engine.tokenize(engine.apply_chat_template([ChatTurn("user", text)]))

    async def serve(
        self, text: str, resume: list[int] | None = None, **sampling: object
    ) -> verifier_pb2.CheckReceiptRequest:
        """One request as a client that audits it would send it: pre-tokenized, so it knows the
        prompt ids; with ``resume``, the segment that continues a stream after those tokens."""
        prompt_ids = self.prompt_ids(text)
        request = inference_pb2.InferenceGenerateRequest(
            model=MODEL,
            prompt_tokens=inference_pb2.PromptTokens(token_ids=prompt_ids),
            sampling=common_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
            resume_token_ids=resume or [],
        )
        check = verifier_pb2.CheckReceiptRequest(prompt_token_ids=prompt_ids, prefix_token_ids=resume or [])
        async for reply in self.provider_stub.Generate(request):
            if reply.HasField("token"):
                check.token_ids.append(reply.token.token_id)
                check.token_texts.append(reply.token.text)
            else:
                check.receipt.CopyFrom(reply.summary.receipt)
        return check

    async def verdict(self, check: verifier_pb2.CheckReceiptRequest) -> verifier_pb2.Verdict:
        signed = await self.verifier_stub.CheckReceipt(check)
        assert signed.verifier_key == self.verifier.keys.identity.public_key
        return open_verdict(signed)  # checks the verifier's signature

    def cheat_with(self, make: Callable[[Engine, ModelIdentity], Engine]) -> None:
        """Swaps the provider's engine for a cheating one that claims the verifier's model."""
        service = self.provider.servicer.service
        assert service is not None
        honest = self.verifier.servicer.service.engines[MODEL].identity  # type: ignore[union-attr]
        inner = service.engines[MODEL]
        service.engines[MODEL] = make(getattr(inner, "inner", inner), honest)


SwarmletFactory = Callable[..., AbstractAsyncContextManager[Swarmlet]]


@pytest.fixture
def swarmlet(inference_node: NodeFactory, tmp_path: Path) -> SwarmletFactory:
    """``async with swarmlet(provider_model=PATH) as s``: a verifier node with the embedded
    model and a provider node serving ``provider_model`` (default: the same model)."""

    @asynccontextmanager
    async def start(provider_model: Path | None = None) -> AsyncIterator[Swarmlet]:
        models = [ModelSettings(name=MODEL, path=provider_model, context_length=1024)]
        async with AsyncExitStack() as stack:
            verifier = await stack.enter_async_context(inference_node(data_dir=tmp_path / "verifier"))
            provider = await stack.enter_async_context(inference_node(data_dir=tmp_path / "provider", models=models))
            channel = await stack.enter_async_context(aio.insecure_channel(provider.address))
            verifier_channel = await stack.enter_async_context(aio.insecure_channel(verifier.address))
            yield Swarmlet(
                provider,
                verifier,
                inference_pb2_grpc.InferenceStub(channel),
                verifier_pb2_grpc.VerifierStub(verifier_channel),
            )

    return start


async def test_honest_provider_passes_greedy_and_sampled_checks(swarmlet: SwarmletFactory) -> None:
    async with swarmlet() as s:
        for index, prompt in enumerate(PROMPTS):
            for sampling in ({}, {"temperature": 0.7, "top_p": 0.95, "seed": 100 + index}, {"temperature": 1.0}):
                served = await s.serve(prompt, max_new_tokens=24, **sampling)
                verdict = await s.verdict(served)
                assert verdict.outcome == PASS, (prompt, sampling, verdict)
                assert verdict.kind == verifier_pb2.VERDICT_KIND_CHECK
                assert verdict.provider_key == s.provider.keys.identity.public_key
                assert verdict.score > 0.9 and "replay-binomial-v1" in verdict.method


async def test_requantized_model_claiming_the_real_one_is_caught(swarmlet: SwarmletFactory, q2k_model: Path) -> None:
    async with swarmlet(provider_model=q2k_model) as s:
        s.cheat_with(ClaimingEngine)  # the Q2_K weights, under the Q4_1 model's digest
        for prompt in PROMPTS[:3]:
            verdict = await s.verdict(await s.serve(prompt, max_new_tokens=24))
            assert verdict.outcome == FAIL, f"greedy Q2_K answer to {prompt!r} passed"
        sampled = [
            (await s.verdict(await s.serve(prompt, max_new_tokens=24, temperature=0.7, seed=7))).outcome
            for prompt in PROMPTS
        ]
        assert FAIL in sampled[:4], sampled


@pytest.mark.parametrize(
    "cheat",
    [
        pytest.param(RandomTokensEngine, id="random-tokens"),
        pytest.param(ReplayingEngine, id="replayed-answer"),
        pytest.param(EarlyStopEngine, id="early-stop"),
    ],
)
async def test_cheats_are_caught(swarmlet: SwarmletFactory, cheat: Callable[[Engine, ModelIdentity], Engine]) -> None:
    async with swarmlet() as s:
        s.cheat_with(cheat)
        outcomes = []
        for prompt in PROMPTS[:3]:
            for sampling in ({}, {"temperature": 0.7, "seed": 3}):
                outcomes.append((await s.verdict(await s.serve(prompt, max_new_tokens=24, **sampling))).outcome)
        # The replaying engine answers its first prompt honestly; every other answer is a cheat.
        cheated = outcomes[1:] if cheat is ReplayingEngine else outcomes
        assert all(outcome == FAIL for outcome in cheated), outcomes


async def test_a_resumed_streams_segment_is_checked_after_its_prefix(swarmlet: SwarmletFactory) -> None:
    """A segment is replayed after the tokens it continued from, and only its own positions
    count: an honest continuation passes (and equals the uninterrupted stream), random tokens
    after an honest prefix fail, and a segment checked without its prefix is refused."""
    async with swarmlet() as s:
        for sampling in ({"max_new_tokens": 40}, {"max_new_tokens": 40, "temperature": 0.7, "seed": 11}):
            whole = await s.serve(PROMPTS[1], **sampling)
            prefix = list(whole.token_ids[:15])
            segment = await s.serve(PROMPTS[1], resume=prefix, **sampling)
            assert list(segment.token_ids) == list(whole.token_ids[15:]), "the continuation is the stream's own"
            verdict = await s.verdict(segment)
            assert verdict.outcome == PASS, (sampling, verdict)
        without = verifier_pb2.CheckReceiptRequest()
        without.CopyFrom(segment)
        del without.prefix_token_ids[:]
        with pytest.raises(aio.AioRpcError) as caught:
            await s.verifier_stub.CheckReceipt(without)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefix_token_ids" in (
            caught.value.details() or ""
        )
        s.cheat_with(RandomTokensEngine)
        cheated = await s.serve(PROMPTS[1], resume=prefix, **sampling)
        assert (await s.verdict(cheated)).outcome == FAIL


async def test_broken_evidence_gets_a_clear_error(swarmlet: SwarmletFactory) -> None:
    async with swarmlet() as s:
        served = await s.serve(PROMPTS[0], max_new_tokens=12)

        async def refused(check: verifier_pb2.CheckReceiptRequest, code: grpc.StatusCode, words: str) -> None:
            with pytest.raises(aio.AioRpcError) as caught:
                await s.verifier_stub.CheckReceipt(check)
            assert caught.value.code() == code and words in (caught.value.details() or ""), caught.value

        tampered = verifier_pb2.CheckReceiptRequest()
        tampered.CopyFrom(served)
        tampered.token_ids[1] ^= 1
        await refused(tampered, grpc.StatusCode.INVALID_ARGUMENT, "commitment does not match")

        wrong_prompt = verifier_pb2.CheckReceiptRequest()
        wrong_prompt.CopyFrom(served)
        wrong_prompt.prompt_token_ids.append(42)
        await refused(wrong_prompt, grpc.StatusCode.INVALID_ARGUMENT, "not the prompt")

        forged = verifier_pb2.CheckReceiptRequest()
        forged.CopyFrom(served)
        forged.receipt.signature = native.Identity.generate().sign(forged.receipt.receipt)
        await refused(forged, grpc.StatusCode.INVALID_ARGUMENT, "signature is invalid")

        # Correctly signed (by some node) but about weights this verifier does not hold, and
        # about token ids outside the vocabulary.
        stranger = native.Identity.generate()
        for digest, token, code, words in (
            (bytes(32), 5, grpc.StatusCode.NOT_FOUND, "no model with weights digest"),
            (
                s.verifier.servicer.service.engines[MODEL].identity.weights_digest,
                10**6,
                grpc.StatusCode.INVALID_ARGUMENT,
                "vocabulary",
            ),  # type: ignore[union-attr]
        ):
            writer = ReceiptWriter(
                stranger, "r", digest, served.prompt_token_ids, common_pb2.SamplingParams(max_new_tokens=1)
            )
            writer.add(token, b"x")
            check = verifier_pb2.CheckReceiptRequest(
                receipt=writer.sign(common_pb2.FINISH_REASON_LENGTH, common_pb2.Timing()),
                prompt_token_ids=served.prompt_token_ids,
                token_ids=[token],
                token_texts=[b"x"],
            )
            await refused(check, code, words)
