"""The re-execution check: did these tokens come from the claimed model with the stated sampling?

The verifier re-runs the served stream on its own copy of the claimed model (same weights
digest), token by token as the provider generated it, under the verifiable sampler
(``native.Sampler``): at every position the provider's choice followed from the logits and a
uniform number derived from the receipt's seed, so the verifier can tell whether the served token
is one an honest node could have chosen (up to numerical jitter, see the sampler's tolerances).

The test (:data:`METHOD`):

- ``m`` of ``n`` served positions are implausible. Greedy streams fail on any (``m >= 1``): the
  served token was more than the logit tolerance below the best one. Sampled streams fail when
  ``P(X >= m)`` for ``X ~ Binomial(n, P0)`` is below ``ALPHA``: more implausible positions than
  jitter explains, with ``P0`` about twice the worst honest rate measured (a batched replay,
  noisier than this one).
- The end must be plausible too: a stream that ended on its own (end of sequence) must end where
  the model could have chosen an end token; one that ended by length must have exactly
  ``max_new_tokens`` tokens; one cut by a stop string must have had stop strings to match. An
  early stop fails here.
- ``score`` is the share of plausible positions (1.0 for a perfect replay).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.inference.engine import Engine, Sampling
from swarmserve import native
from swarmserve.receipts import prompt_digest
from swarmserve.rpc import InvalidArgument, NotFound
from swarmserve.v1 import common_pb2

__all__ = ["ALPHA", "METHOD", "P0", "CheckResult", "Outcome", "check_stream"]

P0 = 0.02
ALPHA = 1e-4
METHOD = (
    f"replay-binomial-v1: verifiable-sampler replay, token by token; implausible = outside "
    f"{native.SAMPLING_CDF_TOLERANCE} of u (sampled) or {native.SAMPLING_LOGIT_TOLERANCE} logits below "
    f"the best (greedy); fail if greedy and m >= 1, or sampled and P(Binomial(n, {P0}) >= m) < {ALPHA}, "
    f"or the end (end of sequence, length, stop string) is implausible"
)


class Outcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class CheckResult:
    outcome: Outcome
    score: float  # share of plausible positions
    positions: int
    implausible: int
    reason: str


def binomial_tail(n: int, m: int, p: float) -> float:
    """P(X >= m) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(m, n + 1))


def _sampling(params: common_pb2.SamplingParams) -> Sampling:
    return Sampling(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p or 1.0,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty or 1.0,
        seed=params.seed,
        stop=tuple(params.stop),
    )


async def check_stream(
    engine: Engine,
    receipt: common_pb2.Receipt,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    prefix_ids: Sequence[int] = (),
) -> CheckResult:
    """Checks one served stream against ``engine`` (the trusted copy of the claimed model).
    ``receipt`` is the body of a receipt already verified against these tokens
    (:func:`~swarmserve.receipts.verify_receipt`). For a segment of a resumed stream,
    ``prefix_ids`` are the tokens before it: the whole stream is replayed and only the segment's
    positions count against its node (a checkpoint segment claims no end). Raises
    :class:`InvalidArgument` when the evidence itself is broken (the prompt or prefix is not the
    one the receipt names, ids outside the vocabulary) and :class:`NotFound` when ``engine`` is
    not the model the receipt claims."""
    if receipt.model_digest != engine.identity.weights_digest:
        raise NotFound(f"this verifier does not hold the model with weights digest {receipt.model_digest.hex()}")
    if not prompt_ids:
        raise InvalidArgument("prompt_token_ids is empty")
    if prompt_digest(prompt_ids) != receipt.prompt_digest:
        raise InvalidArgument("prompt_token_ids are not the prompt the receipt was signed for")
    if receipt.prefix_tokens != len(prefix_ids) or (prefix_ids and prompt_digest(prefix_ids) != receipt.prefix_digest):
        raise InvalidArgument("prefix_token_ids are not the tokens the receipt's segment continued from")
    vocab = engine.vocab_size
    stream = [*prefix_ids, *token_ids]
    if any(token >= vocab for token in (*prompt_ids, *stream)):
        raise InvalidArgument(f"a token id is outside the model's vocabulary of {vocab}")
    if len(prompt_ids) + len(stream) + 1 > engine.identity.context_length:
        raise InvalidArgument(f"the stream is longer than the model's context of {engine.identity.context_length}")
    sampling = _sampling(receipt.sampling)
    replay = await engine.replay(prompt_ids, stream, sampling)  # the sampler refuses bad parameters
    implausible = [p - len(prefix_ids) for p in replay.implausible_positions if p >= len(prefix_ids)]
    n = len(token_ids)
    m = len(implausible)
    score = 1.0 - m / n if n else 1.0
    end_problem = _end_problem(receipt, sampling, stream, replay.end_plausible)
    if end_problem:
        return CheckResult(Outcome.FAIL, score, n, m, end_problem)
    if m and (sampling.greedy or binomial_tail(n, m, P0) < ALPHA):
        first = implausible[0]
        return CheckResult(Outcome.FAIL, score, n, m, f"{m} of {n} tokens implausible (first at {first})")
    if n == 0:  # an end the model could choose, and nothing else: too little to vouch for
        return CheckResult(Outcome.INCONCLUSIVE, score, n, m, "no tokens to check")
    return CheckResult(Outcome.PASS, score, n, m, f"{m} of {n} tokens implausible, end plausible")


def _end_problem(
    receipt: common_pb2.Receipt,
    sampling: Sampling,
    token_ids: Sequence[int],
    end_plausible: bool,
) -> str:
    """Why the stream (all of it, for a resumed one) could not have ended where it did ("" if it
    could; a checkpoint, finish reason UNSPECIFIED, claims no end)."""
    finish = receipt.finish_reason
    if finish == common_pb2.FINISH_REASON_END_OF_SEQUENCE and not end_plausible:
        return f"stream ended after {len(token_ids)} tokens where the model would not end it"
    if finish == common_pb2.FINISH_REASON_LENGTH and len(token_ids) != sampling.max_new_tokens:
        return f"stream claims the length limit of {sampling.max_new_tokens} after {len(token_ids)} tokens"
    if finish == common_pb2.FINISH_REASON_STOP and not sampling.stop:
        # The tokens of a stop string itself are never sent, so the replay cannot see it; a
        # claim is only possible when the request had stop strings.
        return "stream claims a stop string but the request had none"
    return ""
