"""The embedded default engine: llama.cpp through llama-cpp-python.

One ``Llama`` context per slot (the weights are memory-mapped once and shared by the OS), so
``slots`` generations run at once, each on its own worker thread: llama.cpp calls block and
release the GIL, and the event loop never waits on them. Tokens are chosen by the native
verifiable sampler (``native.Sampler``) from llama.cpp's logits, not by llama.cpp's own sampler,
so a verifier can replay every choice from the receipt's seed. Uses two internals of the pinned
llama-cpp-python (the context's per-position logits and its batch) to read logits and to score a
completion in one forward pass without ``logits_all``.
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
from swarmserve import native

__all__ = ["LlamaCppEngine"]

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
            self._contexts = [
                llama_cpp.Llama(
                    model_path=str(model_path),
                    n_ctx=context_length,
                    n_threads=threads,
                    n_threads_batch=threads,
                    logits_all=False,
                    verbose=False,
                )
                for _ in range(slots)
            ]
        except ValueError as error:  # llama-cpp-python's way of saying "cannot load"
            raise EngineUnavailable(f"llama.cpp cannot load {model_path}: {error}") from error
        first = self._contexts[0]
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
        self._free: list[llama_cpp.Llama] = list(self._contexts)
        self._available = asyncio.Semaphore(slots)
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llama")

    def _is_end(self, token: int) -> bool:
        """End-of-generation tokens (end of sequence, end of turn) end a stream unsent."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str) -> list[int]:
        return list(self._contexts[0].tokenize(text.encode(), add_bos=True, special=True))

    def detokenize(self, token_ids: Sequence[int]) -> bytes:
        return bytes(self._contexts[0].detokenize(list(token_ids)))

    def apply_chat_template(self, turns: Sequence[ChatTurn]) -> str:
        if self._chat is None:
            raise ValueError(f"model {self.identity.name} has no chat template; send a prompt")
        messages: Any = [{"role": turn.role, "content": turn.content} for turn in turns]
        return str(self._chat(messages=messages).prompt)

    async def _run_in_slot(self, work: Callable[[llama_cpp.Llama], Any]) -> asyncio.Future[Any]:
        """Starts ``work`` on a free context in a worker thread. The context returns to the
        pool when the thread ends, never earlier, even if the caller is cancelled."""
        await self._available.acquire()
        context = self._free.pop()

        def release(_: object) -> None:
            self._free.append(context)
            self._available.release()

        future = asyncio.get_running_loop().run_in_executor(self._executor, work, context)
        future.add_done_callback(release)
        return future

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> AsyncGenerator[GeneratedToken, None]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[GeneratedToken | None] = asyncio.Queue()
        stop = threading.Event()

        def produce(context: llama_cpp.Llama) -> None:
            try:
                for token in self._generate_blocking(context, prompt_ids, sampling, stop):
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
        context: Any,  # llama_cpp.Llama, whose methods are untyped
        prompt_ids: Sequence[int],
        sampling: Sampling,
        stop: threading.Event,
    ) -> Iterator[GeneratedToken]:
        sampler = _sampler(sampling, prompt_ids)
        self._load_prompt(context, list(prompt_ids))
        for produced in range(1, sampling.max_new_tokens + 1):
            logits = self._logits(context, -1)
            token = sampler.choose(logits.data)
            if stop.is_set() or self._is_end(token):
                return
            logprob = _log_softmax_at(logits, token)[0]
            yield GeneratedToken(token, bytes(context.detokenize([token])), logprob)
            if produced < sampling.max_new_tokens:
                context.eval([token])

    def _logits(self, context: Any, row: int) -> np.ndarray[Any, Any]:
        """One row of llama.cpp's logits, in place. The view drops ctypes' explicit byte-order
        mark ("<f"), which the native sampler's buffer check does not take as float32."""
        return np.ctypeslib.as_array(context._ctx.get_logits_ith(row), shape=(self.vocab_size,)).view(np.float32)

    @staticmethod
    def _load_prompt(context: Any, prompt: list[int]) -> None:
        """Evaluates the prompt, reusing the longest prefix still in this context's KV cache (at
        least the last prompt token is evaluated, for fresh logits)."""
        cached = context.input_ids[: context.n_tokens]
        common = 0
        for held, wanted in zip(cached, prompt, strict=False):
            if held != wanted:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        if not context._ctx.kv_cache_seq_rm(-1, common, -1):
            context.reset()
            context._ctx.kv_cache_seq_rm(-1, 0, -1)
            common = 0
        context.n_tokens = common
        context.eval(prompt[common:])

    async def score(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_alternatives: int
    ) -> list[PositionScore]:
        def work(context: llama_cpp.Llama) -> list[PositionScore]:
            return self._score_blocking(context, list(prompt_ids), list(completion_ids), top_alternatives)

        return list(await (await self._run_in_slot(work)))

    def _score_blocking(
        self,
        context: Any,  # llama_cpp.Llama
        prompt: list[int],
        completion: list[int],
        top_alternatives: int,
    ) -> list[PositionScore]:
        # One forward pass over prompt + completion[:-1], asking llama.cpp for logits only at
        # the positions that predict a completion token.
        ids = prompt + completion
        first = len(prompt) - 1
        context.reset()
        context._ctx.kv_cache_seq_rm(-1, 0, -1)
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
                row = self._logits(context, i)
                target = ids[start + i + 1]
                logprob, top, top_logprob = _log_softmax_at(row, target)
                alternatives: tuple[tuple[int, float], ...] = ()
                if top_alternatives:
                    log_norm = row[top] - top_logprob
                    best = np.argpartition(row, -top_alternatives)[-top_alternatives:]
                    best = best[np.argsort(row[best])[::-1]]
                    alternatives = tuple((int(t), float(row[t] - log_norm)) for t in best)
                scores.append(PositionScore(logprob, top == target, top, top_logprob, alternatives))
        context.reset()  # the KV cache no longer matches what generate() would expect
        return scores

    async def replay(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], sampling: Sampling) -> Replay:
        def work(context: llama_cpp.Llama) -> Replay:
            return self._replay_blocking(context, list(prompt_ids), list(completion_ids), sampling)

        return await (await self._run_in_slot(work))  # type: ignore[no-any-return]

    def _replay_blocking(self, context: Any, prompt: list[int], completion: list[int], sampling: Sampling) -> Replay:
        # Token by token, as generate() ran: llama.cpp's one-token decode uses other kernels than
        # a batched pass, and a batched replay moved logits by up to 1.0 (measured), against 0 here.
        sampler = _sampler(sampling, prompt)
        implausible: list[int] = []
        self._load_prompt(context, prompt)
        for position, served in enumerate(completion):
            row = self._logits(context, -1)
            if served not in sampler.plausible(row.data):
                implausible.append(position)
            sampler.advance(served)
            context.eval([served])
        end_plausible = any(self._is_end(token) for token in sampler.plausible(self._logits(context, -1).data))
        return Replay(tuple(implausible), end_plausible)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for context in self._contexts:
            context.close()


def _sampler(sampling: Sampling, prompt_ids: Sequence[int]) -> native.Sampler:
    return native.Sampler(
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
        sampling.repetition_penalty,
        sampling.seed,
        list(prompt_ids),
    )
