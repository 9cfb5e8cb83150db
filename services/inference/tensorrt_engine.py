"""The GPU engine: TensorRT-LLM through its LLM API. An optional extra (``pip install
swarmserve[tensorrt]`` where NVIDIA's wheels are available), imported only when selected.

Mapping: ``generate`` submits the prompt token ids with ``generate_async(..., streaming=True)``
and turns the cumulative ``CompletionOutput`` of each step into per-token events (ids, the text
the step added, the sampled token's log-probability from ``logprobs=1``). ``score`` sends
prompt + completion as one context with ``return_context_logits=True`` and reads each
completion token's log-probability from the context logits (row i predicts token i + 1), which,
unlike top-N prompt logprobs, always contains the token being scored.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.engine import (
    ChatTurn,
    EngineUnavailable,
    GeneratedToken,
    ModelIdentity,
    PositionScore,
    Replay,
    Sampling,
)
from services.inference.models import weights_digest

__all__ = ["TensorRTEngine"]


def _import_tensorrt_llm() -> Any:
    try:
        module = importlib.import_module("tensorrt_llm")
    except ImportError as error:
        raise EngineUnavailable(
            "engine 'tensorrt-llm' needs the tensorrt_llm package (NVIDIA's wheels, with CUDA); "
            f"it is not importable here: {error}. Use engine 'llama.cpp' on machines without it."
        ) from error
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if gpus == 0:
        raise EngineUnavailable("engine 'tensorrt-llm' needs a CUDA GPU, and none is visible")
    return module


def _logprob_of(entry: Any, token: int) -> float:
    """One position of CompletionOutput.logprobs: a float, or {token_id: Logprob}."""
    if isinstance(entry, dict):
        value = entry.get(token)
        if value is None:
            return float("nan")
        return float(getattr(value, "logprob", value) or 0.0)
    return float(entry)


class TensorRTEngine:
    def __init__(
        self,
        model_path: Path,
        name: str,
        *,
        context_length: int = 4096,
        weights_file: Path | None = None,
    ) -> None:
        trt = _import_tensorrt_llm()
        self._trt = trt
        self._llm = trt.LLM(model=str(model_path), max_seq_len=context_length)
        self._tokenizer = self._llm.tokenizer
        digest_source = weights_file or _largest_file(model_path)
        self.identity = ModelIdentity(
            name=name,
            weights_digest=weights_digest(digest_source),
            quantization=str(getattr(self._llm.args, "dtype", "auto")) if hasattr(self._llm, "args") else "auto",
            context_length=context_length,
            engine="tensorrt-llm",
        )
        self.vocab_size = int(getattr(self._tokenizer, "vocab_size", 0) or len(self._tokenizer.get_vocab()))

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def detokenize(self, token_ids: Sequence[int]) -> bytes:
        return str(self._tokenizer.decode(list(token_ids))).encode()

    def apply_chat_template(self, turns: Sequence[ChatTurn]) -> str:
        messages = [{"role": t.role, "content": t.content} for t in turns]
        return str(self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def sampling_params(self, sampling: Sampling, **extra: Any) -> Any:
        """Our sampling parameters as TensorRT-LLM's ``SamplingParams``."""
        if sampling.greedy:
            knobs: dict[str, Any] = {"top_k": 1, "top_p": 1.0, "temperature": 1.0}
        else:
            knobs = {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k or None,
            }
        return self._trt.SamplingParams(
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            repetition_penalty=sampling.repetition_penalty,
            logprobs=1,
            **knobs,
            **extra,
        )

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        # A resumed stream continues from prompt + served tokens as one prompt; TensorRT-LLM
        # seeds its sampler per request and batches freely, so only greedy continuations are
        # expected to match the uninterrupted stream, and not bit for bit.
        if len(resume) >= sampling.max_new_tokens:
            return
        remaining = replace(sampling, max_new_tokens=sampling.max_new_tokens - len(resume))
        result = self._llm.generate_async([*prompt_ids, *resume], self.sampling_params(remaining), streaming=True)
        sent_tokens, sent_text = 0, ""
        finished = False
        try:
            async for output in result:
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                new_ids = ids[sent_tokens:]
                # The text a step added belongs to the last token of the step (a multi-byte
                # character may need several tokens before it can be shown).
                delta = completion.text[len(sent_text) :]
                logprobs = list(completion.logprobs or [])
                for offset, token in enumerate(new_ids):
                    position = sent_tokens + offset
                    logprob = _logprob_of(logprobs[position], token) if position < len(logprobs) else float("nan")
                    text = delta.encode() if offset == len(new_ids) - 1 else b""
                    yield GeneratedToken(token, text, logprob)
                sent_tokens, sent_text = len(ids), completion.text
            finished = True
        finally:
            if not finished and hasattr(result, "abort"):
                result.abort()  # the client went away: free the GPU slot now

    async def score(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_alternatives: int
    ) -> list[PositionScore]:
        ids = list(prompt_ids) + list(completion_ids)
        params = self._trt.SamplingParams(max_tokens=1, return_context_logits=True)
        output = await self._llm.generate_async(ids, params)
        logits = output.context_logits
        if hasattr(logits, "float"):  # a torch tensor on the GPU
            logits = logits.float().cpu().numpy()
        rows = np.asarray(logits, dtype=np.float64)
        scores = []
        for position, token in enumerate(completion_ids):
            row = rows[len(prompt_ids) - 1 + position]
            log_norm = row.max() + np.log(np.exp(row - row.max()).sum())
            top = int(row.argmax())
            alternatives: tuple[tuple[int, float], ...] = ()
            if top_alternatives:
                best = np.argsort(row)[::-1][:top_alternatives]
                alternatives = tuple((int(t), float(row[t] - log_norm)) for t in best)
            scores.append(
                PositionScore(
                    float(row[token] - log_norm),
                    top == token,
                    top,
                    float(row[top] - log_norm),
                    alternatives,
                )
            )
        return scores

    async def replay(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], sampling: Sampling) -> Replay:
        # Sampling stays on the GPU (its own sampler); pulling every logits row back to run the
        # native sampler would cost more than the generation it verifies.
        raise EngineUnavailable("TensorRT-LLM streams are not sampled verifiably; use a llama.cpp engine to verify")

    async def close(self) -> None:
        shutdown = getattr(self._llm, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _largest_file(path: Path) -> Path:
    """The weights file of a model directory: its largest file."""
    if path.is_file():
        return path
    files = [p for p in path.rglob("*") if p.is_file()]
    if not files:
        raise EngineUnavailable(f"model directory {path} holds no files")
    return max(files, key=lambda p: p.stat().st_size)
