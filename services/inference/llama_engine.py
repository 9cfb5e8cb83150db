"""The embedded default engine: llama.cpp, one context decoding every running request together.

The context holds one KV sequence per slot (``n_seq_max = slots``) and one thread, the decoder,
drives it in steps: each step evaluates, in one ``llama_decode``, the next token of every
sequence that is generating (so the weights are read once per step for all of them, as in
llama.cpp's own server), then the waiting prompt chunks, those of one length together. Tokens
are chosen by the native verifiable sampler (``native.Sampler``) from llama.cpp's logits, not by
llama.cpp's sampler, so a verifier can replay every choice from the receipt's seed.

Reproducible decoding (:mod:`services.inference.schedule`) holds across the batch because:

- every sequence has its own KV cache (``kv_unified = False``): attention runs over that
  sequence's cells only, and a row's logits do not depend on the other rows of its batch
  (``tests/test_batched_decoding.py`` checks both on the pinned llama.cpp, bit for bit);
- a prompt chunk is never cut: llama.cpp splits a batch of several sequences into
  micro-batches with as many tokens of each (``split_equal``), which would cut a chunk where
  another sequence's single token ends, so chunks go in passes of their own, shared only by
  chunks of the same length;
- llama.cpp takes a micro-batch's sequences only while their ids run consecutively, so the
  one-token batch fills any id between two generating sequences with a placeholder token of
  that idle sequence, at its next position, removed again after the step (one row of compute,
  against a second pass over the weights).

Blocking llama.cpp calls run on the decoder thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_cpp as capi
from llama_cpp._internals import LlamaModel
from llama_cpp._logger import set_verbose
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

__all__ = ["LlamaCppEngine", "load_model"]

# llama.cpp's LLAMA_FTYPE values for the quantizations people actually ship.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip

# Tokens one llama_decode takes at most: a score pass is cut into batches of this size.
BATCH_TOKENS = 512


def _log_softmax_at(logits: np.ndarray[Any, Any], token: int) -> tuple[float, int, float]:
    """(log p(token), argmax, log p(argmax)) from one row of raw logits.

    Runs on every generated token: float32 throughout keeps it on numpy's SIMD exp (about 50 us
    for a 49k vocabulary against 320 us in float64), at float32 precision, which is what the API
    reports anyway."""
    top = int(logits.argmax())
    shift = logits[top]
    log_norm = shift + np.log(np.exp(logits - shift).sum(dtype=np.float32))
    return float(logits[token] - log_norm), top, float(shift - log_norm)


def load_model(model_path: Path) -> LlamaModel:
    """The model's weights in llama.cpp's plain CPU layout.

    Where the CPU has them, llama.cpp moves weights into "extra buffer types": AMX tiles on
    recent Xeons, layouts with 4 or 8 rows interleaved for some quantizations elsewhere. With the
    pinned llama.cpp the AMX matmul kills the process on its first decode (SIGSEGV in
    ``ggml_backend_amx_mul_mat``, Xeon with AMX-INT8), and the embedded Q4_1 model has no
    repacked layout on x86 anyway."""
    set_verbose(False)  # llama.cpp logs every load and context to stderr otherwise
    params = capi.llama_model_default_params()
    params.use_extra_bufts = False
    return LlamaModel(path_model=str(model_path), params=params, verbose=False)


@dataclass(frozen=True)
class _Batch:
    """What one sequence evaluates next: ``tokens`` from ``position`` on, and the rows (indices
    into ``tokens``) whose logits it reads afterwards."""

    tokens: tuple[int, ...]
    position: int
    outputs: range


class _Work(ABC):
    """One request's use of one sequence of the shared context, driven by the decoder thread.

    ``begin`` says what to evaluate first, given how many positions the sequence already holds
    as this work would compute them; ``advance`` reads the logits of the batch just evaluated
    and says what comes next (``None``: done). Results reach the event loop through ``deliver``,
    which the decoder thread calls; ``cancelled`` may be set from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.cancelled = threading.Event()

    @property
    @abstractmethod
    def evaluation(self) -> Evaluation | None:
        """What the sequence holds when this work is done, if it follows the schedule."""

    @abstractmethod
    def begin(self, keep: int) -> _Batch | None: ...

    @abstractmethod
    def advance(self, row: Callable[[int], np.ndarray[Any, Any]]) -> _Batch | None: ...

    @abstractmethod
    def deliver(self, item: object) -> None: ...

    def fail(self, error: BaseException) -> None:
        self.deliver(error)


class _Scheduled(_Work):
    """Evaluates a prompt (and tokens already served) in the schedule's batches, then steps
    one token at a time, reading the logits after each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: Sequence[int], served: Sequence[int]) -> None:
        super().__init__(loop)
        self.stream = Evaluation(tuple(prompt), tuple(served))
        self.added: list[int] = []  # tokens chosen to evaluate after ``stream``, in order
        self._pending: deque[tuple[int, ...]] = deque()
        self._position = 0

    @property
    def evaluation(self) -> Evaluation:
        return Evaluation(self.stream.prompt, self.stream.generated + tuple(self.added))

    def begin(self, keep: int) -> _Batch | None:
        self._pending.extend(self.stream.batches(keep))
        self._position = keep
        return self._next()

    def _next(self) -> _Batch:
        tokens = self._pending.popleft()
        last = not self._pending  # only the last batch's last row gives logits anyone reads
        batch = _Batch(tokens, self._position, range(len(tokens) - 1, len(tokens)) if last else range(0))
        self._position += len(tokens)
        return batch

    def advance(self, row: Callable[[int], np.ndarray[Any, Any]]) -> _Batch | None:
        if self._pending:
            return self._next()
        token = self.step(row(-1))
        if token is None:
            return None
        self.added.append(token)
        self._pending.append((token,))
        return self._next()

    @abstractmethod
    def step(self, logits: np.ndarray[Any, Any]) -> int | None:
        """Given the logits after the last evaluated token: the next token to evaluate."""


class _Generation(_Scheduled):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: LlamaCppEngine,
        prompt: Sequence[int],
        sampling: Sampling,
        resume: Sequence[int],
        queue: asyncio.Queue[object],
    ) -> None:
        super().__init__(loop, prompt, resume)
        self._engine, self._sampling, self._queue = engine, sampling, queue
        self._sampler = _sampler(sampling, prompt)
        for served in resume:
            self._sampler.advance(served)
        self._produced = len(resume)

    def step(self, logits: np.ndarray[Any, Any]) -> int | None:
        token = self._sampler.choose(logits.data)
        if self.cancelled.is_set() or self._engine.is_end(token):
            self.deliver(None)
            return None
        self._produced += 1
        logprob = _log_softmax_at(logits, token)[0]
        self.deliver(GeneratedToken(token, self._engine.detokenize([token]), logprob))
        if self._produced >= self._sampling.max_new_tokens:
            self.deliver(None)
            return None
        return token

    def deliver(self, item: object) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


class _Resolving(_Work, ABC):
    """Work whose result is one value, set on a future of the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.result: asyncio.Future[Any] = loop.create_future()

    def deliver(self, item: object) -> None:
        def settle() -> None:
            if self.result.done():
                return
            if isinstance(item, BaseException):
                self.result.set_exception(item)
            else:
                self.result.set_result(item)

        self._loop.call_soon_threadsafe(settle)


class _ReplayWork(_Scheduled, _Resolving):
    """The served completion evaluated one token at a time, as generation evaluated it: a batched
    replay moved logits by up to 1.0 on the embedded model."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: LlamaCppEngine,
        prompt: Sequence[int],
        completion: Sequence[int],
        sampling: Sampling,
    ) -> None:
        super().__init__(loop, prompt, ())
        self._engine, self._completion = engine, list(completion)
        self._sampler = _sampler(sampling, prompt)
        self._implausible: list[int] = []

    def step(self, logits: np.ndarray[Any, Any]) -> int | None:
        plausible = self._sampler.plausible(logits.data)
        position = len(self.added)
        if position == len(self._completion):
            self.deliver(Replay(tuple(self._implausible), any(self._engine.is_end(t) for t in plausible)))
            return None
        served = self._completion[position]
        if served not in plausible:
            self._implausible.append(position)
        self._sampler.advance(served)
        return served


class _ScoreWork(_Resolving):
    """One forward pass over prompt + completion[:-1] in batches of :data:`BATCH_TOKENS`,
    reading logits only at the positions that predict a completion token. Its batches are not
    the schedule's: nothing it leaves in the sequence is reused."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, prompt: Sequence[int], completion: Sequence[int], top_alternatives: int
    ) -> None:
        super().__init__(loop)
        self._ids = list(prompt) + list(completion)
        self._first = len(prompt) - 1
        self._top_alternatives = top_alternatives
        self._start = 0
        self._scores: list[PositionScore] = []

    @property
    def evaluation(self) -> None:
        return None

    def begin(self, keep: int) -> _Batch | None:
        return self._batch()

    def _batch(self) -> _Batch:
        chunk = tuple(self._ids[self._start : min(self._start + BATCH_TOKENS, len(self._ids) - 1)])
        return _Batch(chunk, self._start, range(max(0, self._first - self._start), len(chunk)))

    def advance(self, row: Callable[[int], np.ndarray[Any, Any]]) -> _Batch | None:
        batch = self._batch()
        for index in batch.outputs:
            logits = row(index)
            target = self._ids[self._start + index + 1]
            logprob, top, top_logprob = _log_softmax_at(logits, target)
            alternatives: tuple[tuple[int, float], ...] = ()
            if self._top_alternatives:
                log_norm = logits[top] - top_logprob
                best = np.argpartition(logits, -self._top_alternatives)[-self._top_alternatives :]
                best = best[np.argsort(logits[best])[::-1]]
                alternatives = tuple((int(t), float(logits[t] - log_norm)) for t in best)
            self._scores.append(PositionScore(logprob, top == target, top, top_logprob, alternatives))
        self._start += len(batch.tokens)
        if self._start >= len(self._ids) - 1:
            self.deliver(self._scores)
            return None
        return self._batch()


@dataclass
class _Sequence:
    """One KV sequence of the context: how many positions it holds, what they are where the
    schedule lets a later stream reuse them, and the work using it with its next batch."""

    id: int
    length: int = 0
    held: Evaluation | None = None
    work: _Work | None = None
    batch: _Batch | None = None
    ended_at: int = -1  # the step its last work ended in


def _evaluated(evaluation: Evaluation | None, length: int) -> Evaluation | None:
    """The first ``length`` positions of ``evaluation`` (a batch boundary: batches are evaluated
    whole), as a stream a later one may reuse."""
    if evaluation is None or length <= 0:
        return None
    if length <= len(evaluation.prompt):
        return Evaluation(evaluation.prompt[:length])
    return Evaluation(evaluation.prompt, evaluation.generated[: length - len(evaluation.prompt)])


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml's ``struct ggml_tensor`` (ggml.h), up to its name."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
    ]  # fmt: skip


class _Decoder:
    """The shared context and the thread that steps it. Owns every llama.cpp call on the
    context; other threads only queue work (``submit``) and cancel it.

    With ``count_passes``, ``passes`` records the rows of every pass llama.cpp makes over the
    weights (one per micro-batch, seen as its first layer's norm is computed): what batching is
    for, shown by llama.cpp itself. It costs a Python call per graph node, so tests only."""

    def __init__(
        self, model: LlamaModel, slots: int, context_length: int, threads: int, *, count_passes: bool = False
    ) -> None:
        params = capi.llama_context_default_params()
        params.n_ctx = context_length * slots  # each sequence gets n_ctx / n_seq_max cells
        params.n_batch = params.n_ubatch = max(BATCH_TOKENS, slots)
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        # Its CPU kernel splits long contexts across threads, which would tie a stream's tokens
        # to the thread count (services.inference.schedule).
        params.flash_attn_type = capi.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.kv_unified = False
        self.passes: list[int] = []
        if count_passes:

            def observe(tensor: int, ask: bool, _: object) -> bool:
                head = _TensorHead.from_address(tensor)
                if ask and head.name == b"attn_norm-0":
                    self.passes.append(int(head.ne[1]))
                return False  # nothing to read: llama.cpp computes the graph as it would

            self._observer = capi.ggml_backend_sched_eval_callback(observe)
            params.cb_eval = self._observer
        self._ctx = capi.llama_init_from_model(model.model, params)
        if not self._ctx:
            raise EngineUnavailable(f"llama.cpp cannot make a context of {slots} x {context_length} tokens")
        self.context_length = int(capi.llama_n_ctx_seq(self._ctx))
        self._memory = capi.llama_get_memory(self._ctx)
        self._vocab_size = int(capi.llama_vocab_n_tokens(model.vocab))
        self._batch_tokens = params.n_batch
        self._batch = capi.llama_batch_init(params.n_batch, 0, 1)
        self._sequences = [_Sequence(index) for index in range(slots)]
        self._waiting: deque[_Work] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._steps = 0
        self._thread = threading.Thread(target=self._run, name="llama-decoder", daemon=True)
        self._thread.start()

    def submit(self, work: _Work) -> None:
        with self._wake:
            if self._closed:
                raise EngineUnavailable("the engine is closed")
            self._waiting.append(work)
            self._wake.notify()

    def close(self) -> None:
        """Stops the thread (failing what was waiting) and frees the context; once."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join()
        capi.llama_batch_free(self._batch)
        capi.llama_free(self._ctx)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not any(s.work for s in self._sequences):
                    self._wake.wait()
                if self._closed:
                    break
                admitted = self._admissions()
            for sequence, work in admitted:
                self._start(sequence, work)
            self._step()
        closed = EngineUnavailable("the engine closed")
        for work in [*(s.work for s in self._sequences if s.work), *self._waiting]:
            work.fail(closed)

    def _admissions(self) -> list[tuple[_Sequence, _Work]]:
        """Waiting work onto free sequences, each onto the one holding most of its stream."""
        admitted = []
        free = [s for s in self._sequences if s.work is None]
        while self._waiting and free:
            work = self._waiting.popleft()
            wanted = work.evaluation
            # The most positions kept; then the sequence idle longest, so that what the others
            # hold (a prompt that may come again) is overwritten last.
            sequence = max(free, key=lambda s: (reusable_positions(s.held, wanted) if wanted else 0, -s.ended_at))
            free.remove(sequence)
            sequence.work = work
            admitted.append((sequence, work))
        return admitted

    def _start(self, sequence: _Sequence, work: _Work) -> None:
        wanted = work.evaluation
        keep = reusable_positions(sequence.held, wanted) if wanted else 0
        if not capi.llama_memory_seq_rm(self._memory, sequence.id, keep, -1):
            capi.llama_memory_seq_rm(self._memory, sequence.id, 0, -1)
            keep = 0
        sequence.length, sequence.held = keep, None
        self._next(sequence, lambda: work.begin(keep))

    def _next(self, sequence: _Sequence, batch: Callable[[], _Batch | None]) -> None:
        """Asks the sequence's work for its next batch; ends the work if there is none."""
        try:
            sequence.batch = batch()
        except Exception as error:  # a request this engine cannot run fails alone
            self._end(sequence, error)
            return
        if sequence.batch is None:
            self._end(sequence)
        elif sequence.batch.position + len(sequence.batch.tokens) > self.context_length:
            self._end(sequence, ValueError(f"the stream does not fit the {self.context_length}-token context"))

    def _end(self, sequence: _Sequence, error: BaseException | None = None) -> None:
        """Frees the sequence, keeping what it evaluated for reuse unless llama.cpp failed."""
        work = sequence.work
        assert work is not None
        if error is not None:
            work.fail(error)
        sequence.work, sequence.batch, sequence.ended_at = None, None, self._steps
        sequence.held = _evaluated(work.evaluation, sequence.length)
        if isinstance(error, EngineUnavailable) or sequence.held is None:
            capi.llama_memory_seq_rm(self._memory, sequence.id, 0, -1)
            sequence.length, sequence.held = 0, None

    def _step(self) -> None:
        self._steps += 1
        for sequence in self._sequences:
            if sequence.work is not None and sequence.work.cancelled.is_set():
                self._end(sequence, asyncio.CancelledError())
        singles = [s for s in self._sequences if s.batch is not None and len(s.batch.tokens) == 1]
        chunks = [s for s in self._sequences if s.batch is not None and len(s.batch.tokens) > 1]
        if singles:
            self._decode_singles(singles)
        # Chunks of one length share a llama_decode: llama.cpp's micro-batches then take as many
        # tokens of each, so every chunk stays whole (and sequences whose ids do not run on get
        # micro-batches of their own).
        by_length: dict[int, list[_Sequence]] = {}
        for sequence in chunks:
            by_length.setdefault(len(sequence.batch.tokens), []).append(sequence)  # type: ignore[union-attr]
        for length, group in by_length.items():
            fit = self._batch_tokens // length
            for start in range(0, len(group), fit):
                self._decode([(s, s.batch) for s in group[start : start + fit]])  # type: ignore[misc]

    def _decode_singles(self, singles: list[_Sequence]) -> None:
        """One token of each sequence in ``singles`` in one batch, ids in a consecutive run: an
        id in between gets a placeholder at its next position, removed after."""
        entries: list[tuple[_Sequence, _Batch]] = []
        for sequence in self._sequences[singles[0].id : singles[-1].id + 1]:
            if sequence in singles:
                entries.append((sequence, sequence.batch))  # type: ignore[arg-type]
                continue
            if sequence.length >= self.context_length:  # idle and full: its cache goes
                capi.llama_memory_seq_rm(self._memory, sequence.id, 0, -1)
                sequence.length, sequence.held = 0, None
            entries.append((sequence, _Batch((0,), sequence.length, range(0))))
        self._decode(entries)
        for sequence, batch in entries:
            if sequence not in singles:
                capi.llama_memory_seq_rm(self._memory, sequence.id, batch.position, -1)

    def _decode(self, entries: list[tuple[_Sequence, _Batch]]) -> None:
        """The entries' batches as one ``llama_decode``; then each work reads its rows."""
        batch = self._batch
        first_rows: list[int] = []
        count = 0
        for sequence, evaluated in entries:
            first_rows.append(count)
            for offset, token in enumerate(evaluated.tokens):
                batch.token[count] = token
                batch.pos[count] = evaluated.position + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = sequence.id
                batch.logits[count] = offset in evaluated.outputs
                count += 1
        batch.n_tokens = count
        status = capi.llama_decode(self._ctx, batch)
        for (sequence, evaluated), first_row in zip(entries, first_rows, strict=True):
            work = sequence.work
            if work is None or evaluated is not sequence.batch:
                continue  # a placeholder
            if status != 0:
                self._end(sequence, EngineUnavailable(f"llama_decode failed with status {status}"))
                continue
            sequence.length += len(evaluated.tokens)
            row = self._rows(first_row, len(evaluated.tokens))
            self._next(sequence, lambda work=work, row=row: work.advance(row))  # type: ignore[misc]

    def _rows(self, first_row: int, count: int) -> Callable[[int], np.ndarray[Any, Any]]:
        """Row ``i`` (from the end if negative) of a sequence's batch of ``count`` rows, in
        place. The view drops ctypes' explicit byte-order mark ("<f"), which the native
        sampler's buffer check does not take as float32."""

        def row(index: int) -> np.ndarray[Any, Any]:
            pointer = capi.llama_get_logits_ith(self._ctx, first_row + index % count)
            return np.ctypeslib.as_array(pointer, shape=(self._vocab_size,)).view(np.float32)

        return row


class LlamaCppEngine:
    def __init__(
        self,
        model_path: Path,
        name: str,
        *,
        slots: int = 1,
        context_length: int = 2048,
        threads: int | None = None,
        count_passes: bool = False,
    ) -> None:
        if not model_path.is_file():
            raise EngineUnavailable(f"model file {model_path} does not exist")
        try:
            self._model = load_model(model_path)
        except ValueError as error:  # llama-cpp-python's way of saying "cannot load"
            raise EngineUnavailable(f"llama.cpp cannot load {model_path}: {error}") from error
        self._decoder = _Decoder(
            self._model, slots, context_length, threads or os.cpu_count() or 1, count_passes=count_passes
        )
        metadata = self._model.metadata()
        file_type = int(metadata.get("general.file_type", -1))
        self.identity = ModelIdentity(
            name=name,
            weights_digest=weights_digest(model_path),
            quantization=_FILE_TYPES.get(file_type, f"ftype-{file_type}"),
            context_length=self._decoder.context_length,
            engine="llama.cpp",
        )
        self.vocab_size = int(self._model.n_vocab())
        template = metadata.get("tokenizer.chat_template")
        self._chat = (
            Jinja2ChatFormatter(
                template=template,
                eos_token=self._model.detokenize([self._model.token_eos()], special=True).decode(errors="replace"),
                bos_token=self._model.detokenize([self._model.token_bos()], special=True).decode(errors="replace"),
            )
            if template
            else None
        )

    @property
    def passes(self) -> list[int]:
        """Rows of each pass over the weights so far, if the engine was made to count them."""
        return self._decoder.passes

    def is_end(self, token: int) -> bool:
        """End-of-generation tokens (end of sequence, end of turn) end a stream unsent."""
        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    def tokenize(self, text: str) -> list[int]:
        return list(self._model.tokenize(text.encode(), add_bos=True, special=True))

    def detokenize(self, token_ids: Sequence[int]) -> bytes:
        return bytes(self._model.detokenize(list(token_ids)))

    def apply_chat_template(self, turns: Sequence[ChatTurn]) -> str:
        if self._chat is None:
            raise ValueError(f"model {self.identity.name} has no chat template; send a prompt")
        messages: Any = [{"role": turn.role, "content": turn.content} for turn in turns]
        return str(self._chat(messages=messages).prompt)

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        if len(resume) >= sampling.max_new_tokens:
            return
        queue: asyncio.Queue[object] = asyncio.Queue()
        work = _Generation(asyncio.get_running_loop(), self, prompt_ids, sampling, resume, queue)
        self._decoder.submit(work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, GeneratedToken)
                yield item
        finally:
            work.cancelled.set()  # the decoder frees the sequence at its next step

    async def score(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_alternatives: int
    ) -> list[PositionScore]:
        if not completion_ids:
            return []
        work = _ScoreWork(asyncio.get_running_loop(), prompt_ids, completion_ids, top_alternatives)
        scores: list[PositionScore] = await self._resolve(work)
        return scores

    async def replay(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], sampling: Sampling) -> Replay:
        work = _ReplayWork(asyncio.get_running_loop(), self, prompt_ids, completion_ids, sampling)
        return await self._resolve(work)  # type: ignore[no-any-return]

    async def _resolve(self, work: _Resolving) -> Any:
        self._decoder.submit(work)
        try:
            return await asyncio.shield(work.result)
        finally:
            work.cancelled.set()

    async def close(self) -> None:
        await asyncio.to_thread(self._decoder.close)
        self._model.close()  # type: ignore[no-untyped-call]


def _sampler(sampling: Sampling, prompt_ids: Sequence[int]) -> native.Sampler:
    return native.Sampler(
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
        sampling.repetition_penalty,
        sampling.seed,
        list(prompt_ids),
    )
