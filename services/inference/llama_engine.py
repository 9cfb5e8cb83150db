"""The embedded default engine: llama.cpp through llama-cpp-python.

One ``Llama`` context per slot (the weights are memory-mapped once and shared by the OS), so
``slots`` generations run at once, each on its own worker thread: llama.cpp calls block and
release the GIL, and the event loop never waits on them. Tokens are chosen by the native
verifiable sampler (``native.Sampler``) from llama.cpp's logits, not by llama.cpp's own sampler,
so a verifier can replay every choice from the receipt's seed. Every context evaluates a stream
in the batches :mod:`services.inference.schedule` fixes, so a request's tokens do not depend on
what the context held before. Uses internals of the pinned llama-cpp-python (the context's
per-position logits and its batch, the default model parameters) to read logits, to score a
completion in one forward pass without ``logits_all``, and to keep weights in the plain layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

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
from services.inference.schedule import Evaluation, reusable_positions
from swarmserve import native

__all__ = ["LlamaCppEngine", "ScheduledContext", "load_llama"]

# llama.cpp's LLAMA_FTYPE values for the quantizations people actually ship.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip


def _log_softmax_at(logits: np.ndarray[Any, Any], token: int) -> tuple[float, int, float]:
    """(log p(token), argmax, log p(argmax)) from one row of raw logits.

    Runs on every generated token: float32 throughout keeps it on numpy's SIMD exp (about 50 us
    for a 49k vocabulary against 320 us in float64), at float32 precision, which is what the API
    reports anyway."""
    top = int(logits.argmax())
    shift = logits[top]
    log_norm = shift + np.log(np.exp(logits - shift).sum(dtype=np.float32))
    return float(logits[token] - log_norm), top, float(shift - log_norm)


_MODEL_PARAMS_LOCK = threading.Lock()


def load_llama(model_path: Path, **options: Any) -> llama_cpp.Llama:
    """``llama_cpp.Llama(model_path, **options)`` with the weights in llama.cpp's plain CPU layout.

    Where the CPU has them, llama.cpp moves weights into "extra buffer types": AMX tiles on
    recent Xeons, layouts with 4 or 8 rows interleaved for some quantizations elsewhere. With the
    pinned llama-cpp-python the AMX matmul kills the process on its first decode (SIGSEGV in
    ``ggml_backend_amx_mul_mat``, Xeon with AMX-INT8), and the embedded Q4_1 model has no
    repacked layout on x86 anyway. llama-cpp-python takes no argument for this, so its default
    model parameters are replaced while the model loads (under a lock: models load on threads)."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_layout() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _MODEL_PARAMS_LOCK:
        llama_cpp.llama_cpp.llama_model_default_params = plain_layout
        try:
            return llama_cpp.Llama(model_path=str(model_path), **options)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = defaults


class ScheduledContext:
    """A llama.cpp context that evaluates every stream in the batches of
    :mod:`services.inference.schedule`, keeping of what it held only what the schedule allows.

    It holds ``llama.input_ids[:llama.n_tokens]``: the first ``_prompt_length`` of them (or all,
    if fewer) evaluated as a prompt, the rest one at a time."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self.llama: Any = llama  # llama-cpp-python is untyped
        self._vocab_size = int(llama.n_vocab())
        self._prompt_length = 0

    def held(self) -> Evaluation | None:
        count = self.llama.n_tokens
        prompt_length = min(self._prompt_length, count)
        if not prompt_length:
            return None
        ids = tuple(int(token) for token in self.llama.input_ids[:count])
        return Evaluation(ids[:prompt_length], ids[prompt_length:])

    def evaluate(self, stream: Evaluation) -> int:
        """Brings the context to the end of ``stream``; returns how many positions it kept."""
        keep = reusable_positions(self.held(), stream)
        if not self.llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            self.clear()
            keep = 0
        self.llama.n_tokens = keep
        self._prompt_length = len(stream.prompt)
        for batch in stream.batches(keep):
            self.llama.eval(batch)
        return keep

    def append(self, token: int) -> None:
        """Evaluates one generated token, alone, as the schedule has it."""
        self.llama.eval([token])

    def clear(self) -> None:
        self.llama.reset()
        self.llama._ctx.kv_cache_seq_rm(-1, 0, -1)

    def logits(self, row: int = -1) -> np.ndarray[Any, Any]:
        """One row of llama.cpp's logits, in place. The view drops ctypes' explicit byte-order
        mark ("<f"), which the native sampler's buffer check does not take as float32."""
        return np.ctypeslib.as_array(self.llama._ctx.get_logits_ith(row), shape=(self._vocab_size,)).view(np.float32)


class LlamaCppEngine:
    def __init__(
        self,
        model_path: Path,
        name: str,
        *,
        slots: int = 1,
        context_length: int = 2048,
        threads: int | None = None,
    ) -> None:
        if not model_path.is_file():
            raise EngineUnavailable(f"model file {model_path} does not exist")
        threads = threads or max(1, (os.cpu_count() or 1) // slots)
        try:
            self._slots = [
                ScheduledContext(
                    load_llama(
                        model_path,
                        n_ctx=context_length,
                        n_threads=threads,
                        n_threads_batch=threads,
                        # Its CPU kernel splits long contexts across threads, which would tie a
                        # stream's tokens to the thread count (services.inference.schedule).
                        flash_attn=False,
                        logits_all=False,
                        verbose=False,
                    )
                )
                for _ in range(slots)
            ]
        except ValueError as error:  # llama-cpp-python's way of saying "cannot load"
            raise EngineUnavailable(f"llama.cpp cannot load {model_path}: {error}") from error
        first = self._slots[0].llama
        file_type = int(first.metadata.get("general.file_type", -1))
        self.identity = ModelIdentity(
            name=name,
            weights_digest=weights_digest(model_path),
            quantization=_FILE_TYPES.get(file_type, f"ftype-{file_type}"),
            context_length=first.n_ctx(),
            engine="llama.cpp",
        )
        self.vocab_size = first.n_vocab()
        template = first.metadata.get("tokenizer.chat_template")
        self._vocab = first._model.vocab
        self._chat = (
            Jinja2ChatFormatter(
                template=template,
                eos_token=first.detokenize([first.token_eos()], special=True).decode(errors="replace"),
                bos_token=first.detokenize([first.token_bos()], special=True).decode(errors="replace"),
            )
            if template
            else None
        )
        self._free = list(self._slots)
        self._available = asyncio.Semaphore(slots)
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llama")

    def _is_end(self, token: int) -> bool:
        """End-of-generation tokens (end of sequence, end of turn) end a stream unsent."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str) -> list[int]:
        return list(self._slots[0].llama.tokenize(text.encode(), add_bos=True, special=True))

    def detokenize(self, token_ids: Sequence[int]) -> bytes:
        return bytes(self._slots[0].llama.detokenize(list(token_ids)))

    def apply_chat_template(self, turns: Sequence[ChatTurn]) -> str:
        if self._chat is None:
            raise ValueError(f"model {self.identity.name} has no chat template; send a prompt")
        messages: Any = [{"role": turn.role, "content": turn.content} for turn in turns]
        return str(self._chat(messages=messages).prompt)

    async def _run_in_slot(self, work: Callable[[ScheduledContext], Any]) -> asyncio.Future[Any]:
        """Starts ``work`` on a free context in a worker thread. The context returns to the
        pool when the thread ends, never earlier, even if the caller is cancelled."""
        await self._available.acquire()
        slot = self._free.pop()

        def release(_: object) -> None:
            self._free.append(slot)
            self._available.release()

        future = asyncio.get_running_loop().run_in_executor(self._executor, work, slot)
        future.add_done_callback(release)
        return future

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[GeneratedToken | None] = asyncio.Queue()
        stop = threading.Event()

        def produce(slot: ScheduledContext) -> None:
            try:
                for token in self._generate_blocking(slot, prompt_ids, sampling, resume, stop):
                    loop.call_soon_threadsafe(tokens.put_nowait, token)
            finally:
                loop.call_soon_threadsafe(tokens.put_nowait, None)

        future = await self._run_in_slot(produce)
        try:
            while (token := await tokens.get()) is not None:
                yield token
            await future  # re-raises what the worker raised
        finally:
            stop.set()  # the worker checks this after every token
            with contextlib.suppress(BaseException):
                await asyncio.shield(future)

    def _generate_blocking(
        self,
        slot: ScheduledContext,
        prompt_ids: Sequence[int],
        sampling: Sampling,
        resume: Sequence[int],
        stop: threading.Event,
    ) -> Iterator[GeneratedToken]:
        sampler = _sampler(sampling, prompt_ids)
        for served in resume:
            sampler.advance(served)
        slot.evaluate(Evaluation(tuple(prompt_ids), tuple(resume)))
        for produced in range(len(resume) + 1, sampling.max_new_tokens + 1):
            logits = slot.logits()
            token = sampler.choose(logits.data)
            if stop.is_set() or self._is_end(token):
                return
            logprob = _log_softmax_at(logits, token)[0]
            yield GeneratedToken(token, bytes(slot.llama.detokenize([token])), logprob)
            if produced < sampling.max_new_tokens:
                slot.append(token)

    async def score(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_alternatives: int
    ) -> list[PositionScore]:
        def work(slot: ScheduledContext) -> list[PositionScore]:
            return self._score_blocking(slot, list(prompt_ids), list(completion_ids), top_alternatives)

        return list(await (await self._run_in_slot(work)))

    @staticmethod
    def _score_blocking(
        slot: ScheduledContext,
        prompt: list[int],
        completion: list[int],
        top_alternatives: int,
    ) -> list[PositionScore]:
        # One forward pass over prompt + completion[:-1], asking llama.cpp for logits only at
        # the positions that predict a completion token.
        ids = prompt + completion
        first = len(prompt) - 1
        slot.clear()
        context = slot.llama
        batch = context._batch
        scores: list[PositionScore] = []
        evaluated = ids[:-1]
        for start in range(0, len(evaluated), context.n_batch):
            chunk = evaluated[start : start + context.n_batch]
            batch.set_batch(chunk, n_past=start, logits_all=False)
            for i in range(len(chunk)):
                batch.batch.logits[i] = start + i >= first
            context._ctx.decode(batch)
            for i in range(max(0, first - start), len(chunk)):
                row = slot.logits(i)
                target = ids[start + i + 1]
                logprob, top, top_logprob = _log_softmax_at(row, target)
                alternatives: tuple[tuple[int, float], ...] = ()
                if top_alternatives:
                    log_norm = row[top] - top_logprob
                    best = np.argpartition(row, -top_alternatives)[-top_alternatives:]
                    best = best[np.argsort(row[best])[::-1]]
                    alternatives = tuple((int(t), float(row[t] - log_norm)) for t in best)
                scores.append(PositionScore(logprob, top == target, top, top_logprob, alternatives))
        slot.clear()  # batches other than the schedule's: nothing here may be reused
        return scores

    async def replay(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], sampling: Sampling) -> Replay:
        def work(slot: ScheduledContext) -> Replay:
            return self._replay_blocking(slot, list(prompt_ids), list(completion_ids), sampling)

        return await (await self._run_in_slot(work))  # type: ignore[no-any-return]

    def _replay_blocking(
        self, slot: ScheduledContext, prompt: list[int], completion: list[int], sampling: Sampling
    ) -> Replay:
        # In generate()'s batches (the schedule's), so an honest stream replays to the same
        # logits on the same build and CPU kind; a batched replay moved logits by up to 1.0.
        sampler = _sampler(sampling, prompt)
        implausible: list[int] = []
        slot.evaluate(Evaluation(tuple(prompt)))
        for position, served in enumerate(completion):
            if served not in sampler.plausible(slot.logits().data):
                implausible.append(position)
            sampler.advance(served)
            slot.append(served)
        end_plausible = any(self._is_end(token) for token in sampler.plausible(slot.logits().data))
        return Replay(tuple(implausible), end_plausible)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for slot in self._slots:
            slot.llama.close()


def _sampler(sampling: Sampling, prompt_ids: Sequence[int]) -> native.Sampler:
    return native.Sampler(
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
        sampling.repetition_penalty,
        sampling.seed,
        list(prompt_ids),
    )
