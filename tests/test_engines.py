"""The emulated engine (benchmarks only) and the TensorRT-LLM adapter.

The TensorRT-LLM tests are CONTRACT TESTS: no GPU is available to this project's CI, so they
drive the real adapter (services/inference/tensorrt_engine.py) against a small fake
``tensorrt_llm`` module that reproduces the LLM API's shapes as documented (``LLM``,
``SamplingParams``, ``generate_async`` streaming cumulative ``CompletionOutput``s with
``logprobs`` as ``{token_id: Logprob}``, ``context_logits``). They check our request and stream
mapping, not TensorRT-LLM itself."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from services.inference.config import ProviderPolicy
from services.inference.emulated import EmulatedEngine
from services.inference.engine import EngineUnavailable, Sampling
from services.inference.service import (
    GenerateRequest,
    GenerationSummary,
    InferenceService,
    SamplingRequest,
    TokenEvent,
)
from swarmserve import native
from swarmserve.receipts import verify_receipt

# --- emulated engine ---------------------------------------------------------------------


async def run(engine: EmulatedEngine, prompt: list[int], n: int) -> list[int]:
    return [t.token_id async for t in engine.generate(prompt, Sampling(max_new_tokens=n))]


async def test_emulated_output_is_deterministic_and_scores_its_own_choices() -> None:
    engine = EmulatedEngine("emu", decode_us_per_token=0, prefill_us_per_token=0)
    prompt = engine.tokenize("the same prompt every time")
    first, second = await run(engine, prompt, 12), await run(engine, prompt, 12)
    assert first == second and len(first) == 12
    assert await run(engine, engine.tokenize("another prompt"), 12) != first
    scores = await engine.score(prompt, first, 0)
    assert all(p.is_top_choice for p in scores)
    altered = await engine.score(prompt, [first[0] + 1, *first[1:]], 0)
    assert not altered[0].is_top_choice
    assert engine.identity.engine == "emulated"


async def test_emulated_prefix_cache_cuts_prefill() -> None:
    engine = EmulatedEngine("emu", prefill_us_per_token=2000, decode_us_per_token=0)
    shared = list(range(128))
    started = time.monotonic()
    await run(engine, [*shared, 1, 2, 3], 1)
    cold = time.monotonic() - started
    started = time.monotonic()
    await run(engine, [*shared, 7, 8, 9], 1)
    warm = time.monotonic() - started
    assert cold >= 0.25 and warm < cold / 3, (cold, warm)
    assert engine.prefix_hits == 128


async def test_emulated_slots_bound_concurrency() -> None:
    engine = EmulatedEngine("emu", slots=1, prefill_us_per_token=0, decode_us_per_token=10_000, batch_slowdown=0)
    started = time.monotonic()
    await asyncio.gather(run(engine, [1], 10), run(engine, [2], 10))
    assert time.monotonic() - started >= 0.19  # two requests of ~0.1 s, one at a time


async def test_emulated_engine_serves_through_the_node_with_receipts() -> None:
    identity = native.Identity.generate()
    engine = EmulatedEngine("emu", decode_us_per_token=0, prefill_us_per_token=0)
    service = InferenceService(identity, {"emu": engine}, ProviderPolicy())
    events = [
        e
        async for e in service.generate(
            GenerateRequest(model="emu", prompt="a b c", sampling=SamplingRequest(max_new_tokens=6))
        )
    ]
    tokens = [e.token for e in events if isinstance(e, TokenEvent)]
    summary = events[-1]
    assert isinstance(summary, GenerationSummary) and len(tokens) == 6
    verify_receipt(
        summary.receipt,
        [t.token_id for t in tokens],
        [t.text for t in tokens],
        node_key=identity.public_key,
    )


# --- TensorRT-LLM: contract tests against a fake module ----------------------------------


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


@dataclass
class FakeCompletion:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, FakeLogprob]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class FakeOutput:
    outputs: list[FakeCompletion]
    finished: bool = False
    context_logits: Any = None


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeTokenizer:
    vocab_size = 100

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


class FakeResult:
    """What generate_async returns: async-iterable when streaming, awaitable otherwise."""

    def __init__(self, steps: list[FakeOutput]) -> None:
        self.steps = steps
        self.aborted = False

    def __aiter__(self) -> AsyncIterator[FakeOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[FakeOutput]:
        for step in self.steps:
            await asyncio.sleep(0)
            yield step

    def __await__(self) -> Iterator[Any]:
        async def last() -> FakeOutput:
            return self.steps[-1]

        return last().__await__()

    def abort(self) -> None:
        self.aborted = True


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, model: str, max_seq_len: int) -> None:
        self.model, self.max_seq_len = model, max_seq_len
        self.tokenizer = FakeTokenizer()
        self.calls: list[tuple[list[int], FakeSamplingParams, bool]] = []
        self.results: list[FakeResult] = []
        FakeLLM.instances.append(self)

    def generate_async(
        self, inputs: list[int], sampling_params: FakeSamplingParams, streaming: bool = False
    ) -> FakeResult:
        self.calls.append((inputs, sampling_params, streaming))
        if sampling_params.kwargs.get("return_context_logits"):
            logits = np.full((len(inputs), 100), -5.0)
            for row in range(len(inputs)):
                logits[row, (row * 7) % 100] = 5.0  # the "model" predicts (row * 7) % 100 next
            result = FakeResult([FakeOutput([FakeCompletion()], True, logits)])
        else:
            # Three steps: one token, then two at once, then one, with cumulative fields.
            ids = [11, 12, 13, 14]
            steps, texts = [[0], [1, 2], [3]], ["He", "Hello, wo", "Hello, world"]
            outputs = []
            upto = 0
            for step, text in zip(steps, texts, strict=True):
                upto += len(step)
                outputs.append(
                    FakeOutput(
                        [
                            FakeCompletion(
                                text=text,
                                token_ids=ids[:upto],
                                logprobs=[{t: FakeLogprob(-0.1 * (i + 1))} for i, t in enumerate(ids[:upto])],
                                finish_reason="length" if upto == 4 else None,
                            )
                        ],
                        finished=upto == 4,
                    )
                )
            result = FakeResult(outputs)
        self.results.append(result)
        return result


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("tensorrt_llm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    monkeypatch.setitem(sys.modules, "torch", torch)
    FakeLLM.instances.clear()
    return module


def make_engine(tmp_path: Path) -> Any:
    from services.inference.tensorrt_engine import TensorRTEngine

    (tmp_path / "model.safetensors").write_bytes(b"weights" * 100)
    (tmp_path / "config.json").write_text("{}")
    return TensorRTEngine(tmp_path, "trt-model", context_length=512)


def test_contract_sampling_parameters_map_to_tensorrt(fake_tensorrt: types.ModuleType, tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    assert FakeLLM.instances[0].model == str(tmp_path) and FakeLLM.instances[0].max_seq_len == 512
    assert engine.identity.engine == "tensorrt-llm" and engine.vocab_size == 100
    greedy = engine.sampling_params(Sampling(max_new_tokens=32, seed=5)).kwargs
    assert greedy == {
        "max_tokens": 32,
        "seed": 5,
        "repetition_penalty": 1.0,
        "logprobs": 1,
        "top_k": 1,
        "top_p": 1.0,
        "temperature": 1.0,
    }
    sampled = engine.sampling_params(Sampling(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=0, seed=9)).kwargs
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["top_k"] is None
    assert (
        engine.apply_chat_template(
            [__import__("services.inference.engine", fromlist=["ChatTurn"]).ChatTurn("user", "hi")]
        )
        == "user:hi|assistant:"
    )


async def test_contract_stream_maps_cumulative_outputs_to_tokens(
    fake_tensorrt: types.ModuleType, tmp_path: Path
) -> None:
    engine = make_engine(tmp_path)
    tokens = [t async for t in engine.generate([1, 2, 3], Sampling(max_new_tokens=4))]
    assert [t.token_id for t in tokens] == [11, 12, 13, 14]
    # The text a step added goes to its last token; the concatenation is the full text.
    assert [t.text for t in tokens] == [b"He", b"", b"llo, wo", b"rld"]
    assert b"".join(t.text for t in tokens) == b"Hello, world"
    assert [round(t.logprob, 3) for t in tokens] == [-0.1, -0.2, -0.3, -0.4]
    inputs, params, streaming = FakeLLM.instances[0].calls[0]
    assert inputs == [1, 2, 3] and streaming and params.kwargs["logprobs"] == 1


async def test_contract_closing_the_stream_aborts_the_request(fake_tensorrt: types.ModuleType, tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    stream = engine.generate([1], Sampling(max_new_tokens=4))
    await stream.__anext__()
    await stream.aclose()
    assert FakeLLM.instances[0].results[0].aborted


async def test_contract_score_reads_context_logits(fake_tensorrt: types.ModuleType, tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    prompt = [3, 4]
    completion = [7, 50]  # row 1 predicts 7 (its top choice); row 2 predicts 14, not 50
    scores = await engine.score(prompt, completion, 2)
    assert [s.is_top_choice for s in scores] == [True, False]
    assert scores[0].top_token_id == 7 and scores[1].top_token_id == 14
    assert scores[0].logprob > -0.01 and scores[1].logprob < -9
    assert scores[0].alternatives[0][0] == 7 and len(scores[0].alternatives) == 2
    inputs, params, streaming = FakeLLM.instances[0].calls[0]
    assert inputs == [3, 4, 7, 50] and params.kwargs["return_context_logits"] and not streaming


def test_contract_missing_package_or_gpu_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.inference.tensorrt_engine import TensorRTEngine

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails
    with pytest.raises(EngineUnavailable, match="needs the tensorrt_llm package"):
        TensorRTEngine(tmp_path, "m")
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.ModuleType("tensorrt_llm"))
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    with pytest.raises(EngineUnavailable, match="needs a CUDA GPU"):
        TensorRTEngine(tmp_path, "m")
