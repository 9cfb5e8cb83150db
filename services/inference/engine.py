"""The engine interface every model backend implements, and the domain types it speaks.

An engine runs one model. The node around it does admission, policy, receipts and gRPC; the
engine only tokenizes, generates (an async stream of tokens) and scores (teacher forcing).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "ChatTurn",
    "Engine",
    "EngineUnavailable",
    "FinishReason",
    "GeneratedToken",
    "ModelIdentity",
    "PositionScore",
    "Replay",
    "Sampling",
]


class EngineUnavailable(RuntimeError):
    """The selected engine cannot run here (package or GPU missing, model file unreadable)."""


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    END_OF_SEQUENCE = "end_of_sequence"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ModelIdentity:
    """What a model is: two nodes serve the same model only if ``weights_digest`` matches."""

    name: str
    weights_digest: bytes  # BLAKE3 of the weights file as loaded
    quantization: str
    context_length: int
    engine: str


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters (node defaults applied, seed chosen)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token: its id, the exact bytes it adds to the text, and the
    log-probability of choosing it under the model's (unmodified) distribution."""

    token_id: int
    text: bytes
    logprob: float


@dataclass(frozen=True)
class PositionScore:
    """The model's view of one completion position under teacher forcing."""

    logprob: float
    is_top_choice: bool
    top_token_id: int
    top_logprob: float
    alternatives: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Replay:
    """A served stream re-run under the verifiable sampler (``native.Sampler``) with teacher
    forcing: which served tokens an honest node with this model could have chosen."""

    implausible_positions: tuple[int, ...]  # completion positions no honest node would have served
    end_plausible: bool  # whether the position after the last token could choose an end token


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "system", "user" or "assistant"
    content: str


class Engine(Protocol):
    """A loaded model. Blocking work must not run on the event loop."""

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def vocab_size(self) -> int: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, with the model's beginning-of-sequence token if it uses one;
        special-token markup (as a chat template writes it) is parsed as special tokens."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> bytes: ...

    def apply_chat_template(self, turns: Sequence[ChatTurn]) -> str:
        """The prompt text for a chat, ending where the assistant's answer starts."""
        ...

    def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        """Streams generated tokens until the end-of-sequence token (not yielded) or
        ``sampling.max_new_tokens``. Stop strings are applied by the caller. Closing the
        iterator early stops generation promptly and frees the engine's slot.

        ``resume``: the first tokens of this stream, already served (by this node or another);
        generation continues after them, at their position under the same seed, and
        ``max_new_tokens`` counts them. Engines that decode reproducibly (llama.cpp) then yield
        exactly the tokens the uninterrupted stream yielded after them."""
        ...

    async def score(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_alternatives: int
    ) -> list[PositionScore]:
        """Teacher-forced log-probabilities of ``completion_ids`` after ``prompt_ids``."""
        ...

    async def replay(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], sampling: Sampling) -> Replay:
        """Replays the verifiable sampler over a served completion (see :class:`Replay`).
        Raises :class:`EngineUnavailable` for engines that do not sample verifiably."""
        ...

    async def close(self) -> None: ...
