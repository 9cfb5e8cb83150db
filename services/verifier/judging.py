"""How a judge decides a duel: two providers' answers to one prompt, scored on the judge's own
copy of the model both claim (the same weights digest as both receipts).

Methods (the verdict's ``method`` names the one used):

- ``likelihood`` (the default, :data:`LIKELIHOOD_METHOD`): each answer's mean teacher-forced
  log-probability per token after the prompt, under the reference model. The margin ``d`` is the
  first answer's mean minus the second's (nats per token). Each answer is scored on its own,
  conditioned only on the prompt, so the order in which the two are presented cannot matter: the
  method has no position bias to cancel. A cheaper model's sampled text, random tokens, or an
  answer to another prompt is less likely under the reference model than an honest answer.
- ``llm`` (optional, :data:`LLM_METHOD`): the reference model asked, through its chat template,
  which of two answers is better; the preference is the log-probability of replying "1" minus
  that of "2". Asked in both orders (A as answer 1, then B as answer 1) and averaged, so a
  constant preference for a position cancels. Only as good as the model is at judging.

``|d| < TIE_MARGIN`` is undecided (honest providers of one model often tie); otherwise the side
with the higher score wins. The verdict's score is ``1 - exp(-|d|)``, in [0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.inference.engine import ChatTurn, Engine

__all__ = ["LIKELIHOOD_METHOD", "LLM_METHOD", "TIE_MARGIN", "JudgeMethod", "Judgement", "judge"]

TIE_MARGIN = 0.02
LIKELIHOOD_METHOD = f"duel-likelihood-v1: mean log-prob per answer token under the reference model, each answer scored alone; tie below {TIE_MARGIN} nats/token"  # noqa: E501
LLM_METHOD = f"duel-llm-judge-v1: log P('1') - log P('2') for 'which answer is better', both orders averaged; tie below {TIE_MARGIN}"  # noqa: E501
JudgeMethod = Literal["likelihood", "llm"]

_LLM_QUESTION = (
    "Question:\n{prompt}\n\nAnswer 1:\n{first}\n\nAnswer 2:\n{second}\n\n"
    "Which answer is better, more correct and more helpful? Reply with 1 or 2 only."
)


@dataclass(frozen=True)
class Judgement:
    margin: float  # > 0: the first answer is better
    method: str

    @property
    def preferred(self) -> int | None:
        """0 for the first answer, 1 for the second, None for a tie."""
        if abs(self.margin) < TIE_MARGIN:
            return None
        return 0 if self.margin > 0 else 1

    @property
    def score(self) -> float:
        return 1.0 - math.exp(-abs(self.margin))


async def judge(
    engine: Engine,
    method: JudgeMethod,
    prompt_text: str,
    prompt_ids: Sequence[int],
    answers: tuple[Sequence[int], Sequence[int]],
) -> Judgement:
    if method == "llm":
        return Judgement(await _llm_preference(engine, prompt_text, answers), LLM_METHOD)
    first, second = answers
    margin = await _mean_logprob(engine, prompt_ids, first) - await _mean_logprob(engine, prompt_ids, second)
    return Judgement(margin, LIKELIHOOD_METHOD)


async def _mean_logprob(engine: Engine, prompt_ids: Sequence[int], answer: Sequence[int]) -> float:
    if not answer:
        return -100.0  # an empty answer says nothing: worse than any real per-token score
    positions = await engine.score(prompt_ids, answer, 0)
    return sum(p.logprob for p in positions) / len(positions)


async def _llm_preference(engine: Engine, prompt_text: str, answers: tuple[Sequence[int], Sequence[int]]) -> float:
    texts = [engine.detokenize(ids).decode("utf-8", errors="replace") for ids in answers]
    forward = await _prefers_first(engine, prompt_text, texts[0], texts[1])
    backward = await _prefers_first(engine, prompt_text, texts[1], texts[0])
    return (forward - backward) / 2


async def _prefers_first(engine: Engine, prompt_text: str, first: str, second: str) -> float:
    question = _LLM_QUESTION.format(prompt=prompt_text, first=first, second=second)
    template = engine.apply_chat_template([ChatTurn("user", question)])
    context = engine.tokenize(template)
    choices = []
    for reply in ("1", "2"):
        reply_ids = engine.tokenize(template + reply)[len(context) :] or engine.tokenize(reply)[-1:]
        choices.append((await engine.score(context, reply_ids[:1], 0))[0].logprob)
    return choices[0] - choices[1]
