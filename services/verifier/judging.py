"""How a judge decides a duel: two providers' answers to one prompt, scored on the judge's own
copy of the model both claim (the same weights digest as both receipts).

First, each answer is re-executed under the verifiable sampler, exactly as a re-execution check
does (``checks.py``; :data:`REPLAY_METHOD`). When exactly one side fails, it loses, by
:data:`REPLAY_MARGIN`. When both pass, the vote is undecided: two providers that both served
what the claimed model would have served with their seeds are both honest, and neither should
lose stake because one sampled a likelier answer. (When both fail, it is undecided too: a duel
convicts one side; the next duel of either convicts it.) Only when the judge's engine cannot
replay (an engine without the verifiable sampler) does it fall back to comparing answers, by
the node's ``judge_method``:

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

from services.inference.engine import ChatTurn, Engine, EngineUnavailable
from services.verifier.checks import METHOD as CHECK_METHOD
from services.verifier.checks import CheckResult, Outcome, check_stream
from swarmserve.v1 import common_pb2

__all__ = [
    "LIKELIHOOD_METHOD",
    "LLM_METHOD",
    "REPLAY_MARGIN",
    "REPLAY_METHOD",
    "TIE_MARGIN",
    "JudgeMethod",
    "Judgement",
    "judge",
]

TIE_MARGIN = 0.02
REPLAY_MARGIN = 10.0  # nats per token: far beyond any likelihood margin (score 1 - e^-10)
REPLAY_METHOD = (
    f"duel-replay-v1: each answer re-executed as a check ({CHECK_METHOD.split(':')[0]}); the side that "
    "fails loses; both pass or both fail: undecided"
)
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
    replays: tuple[CheckResult, CheckResult] | None = None  # with REPLAY_METHOD

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
    receipts: tuple[common_pb2.Receipt, common_pb2.Receipt],
    answers: tuple[Sequence[int], Sequence[int]],
) -> Judgement:
    """``receipts``: the bodies of the answers' receipts, already verified against them."""
    try:
        replays = (
            await check_stream(engine, receipts[0], prompt_ids, answers[0]),
            await check_stream(engine, receipts[1], prompt_ids, answers[1]),
        )
    except EngineUnavailable:
        return await _compare(engine, method, prompt_text, prompt_ids, answers)
    first_failed, second_failed = (replay.outcome is Outcome.FAIL for replay in replays)
    margin = 0.0 if first_failed == second_failed else (-REPLAY_MARGIN if first_failed else REPLAY_MARGIN)
    return Judgement(margin, REPLAY_METHOD, replays)


async def _compare(
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
