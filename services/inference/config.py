"""An inference node's configuration: which models it serves, and its operator's policy.

Everything lives in one YAML file (``swarmserve inference --config FILE``), with
``SWARMSERVE_*`` environment overrides (see :mod:`swarmserve.config`); with no file at all the
node serves the embedded SmolLM2 model with the defaults below.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.inference.models import DEFAULT_MODEL_NAME
from services.relay.config import CircuitSettings
from swarmserve.config import NodeConfig, ServerSettings, StrictModel

__all__ = [
    "DEFAULT_LISTEN",
    "EmulatedSettings",
    "InferenceConfig",
    "ModelSettings",
    "PriceSettings",
    "ProviderPolicy",
    "ServingWindow",
]

DEFAULT_LISTEN = "127.0.0.1:7200"


class EmulatedSettings(StrictModel):
    """Timing of the emulated engine (benchmarks only)."""

    prefill_us_per_token: float = Field(200.0, ge=0)
    decode_us_per_token: float = Field(20_000.0, ge=0)
    batch_slowdown: float = Field(0.1, ge=0, description="extra per-token time per extra running request")
    prefix_cache_chunks: int = Field(4096, ge=0)
    vocab_size: int = Field(32_000, ge=2)


class ModelSettings(StrictModel):
    """One model this node serves."""

    name: str = Field(DEFAULT_MODEL_NAME, min_length=1, max_length=128)
    engine: Literal["llama.cpp", "tensorrt-llm", "emulated"] = "llama.cpp"
    path: Path | None = Field(
        None,
        description="GGUF file (llama.cpp) or model directory (tensorrt-llm); default: the embedded SmolLM2",
    )
    context_length: int = Field(2048, ge=64, le=1 << 20)
    threads: int | None = Field(
        None, ge=1, description="llama.cpp threads of the context every slot shares (default: all cores)"
    )
    emulated: EmulatedSettings = EmulatedSettings()

    @model_validator(mode="after")
    def _path_when_needed(self) -> ModelSettings:
        if self.engine == "tensorrt-llm" and self.path is None:
            raise ValueError("engine tensorrt-llm needs path: a Hugging Face model directory")
        return self


class ServingWindow(StrictModel):
    """A daily window (UTC) in which the node serves; end before start wraps past midnight."""

    start: dt.time
    end: dt.time

    def contains(self, moment: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


class PriceSettings(StrictModel):
    """What the node charges, in ledger credits (published in its descriptor)."""

    credits_per_1k_prompt_tokens: int = Field(1, ge=0)
    credits_per_1k_completion_tokens: int = Field(10, ge=0)
    credits_per_token: int = Field(
        1, ge=1, description="what one payment token is worth (callers pay each request's bound in tokens)"
    )


class ProviderPolicy(StrictModel):
    """The operator decides when and how the node serves."""

    max_concurrent: int = Field(2, ge=1, le=256, description="requests generating at once")
    max_queue: int = Field(16, ge=0, le=100_000, description="requests waiting; beyond: RESOURCE_EXHAUSTED")
    max_prompt_tokens: int = Field(1536, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    default_new_tokens: int = Field(128, ge=1)
    serving_hours: list[ServingWindow] = Field(default_factory=list, description="UTC windows; empty means always")
    accept_callers: Literal["any", "min_balance"] = Field(
        "any",
        description="min_balance: serve only callers that sign their requests with a key whose account holds "
        "at least min_caller_balance available credits on the ledger's chain (needs ledger.genesis)",
    )
    min_caller_balance: int = Field(0, ge=0)
    max_unpaid_credits: int = Field(
        100,
        ge=0,
        description="with a ledger: sell payment tokens to a buyer (a router of another account) while its "
        "cheques cover all but this many credits of the tokens sold to it",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ProviderPolicy:
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_new_tokens ({self.default_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        return self

    def serving_at(self, moment: dt.datetime) -> bool:
        if not self.serving_hours:
            return True
        now = moment.astimezone(dt.UTC).time()
        return any(window.contains(now) for window in self.serving_hours)


class InferenceConfig(NodeConfig):
    server: ServerSettings = ServerSettings(listen=DEFAULT_LISTEN)
    advertise: str | None = Field(None, description="address published to peers (default: the listen address)")
    circuits: CircuitSettings = CircuitSettings()
    models: list[ModelSettings] = Field(default_factory=lambda: [ModelSettings()], min_length=1)
    policy: ProviderPolicy = ProviderPolicy()
    price: PriceSettings = PriceSettings()
    verifier: bool = Field(
        True,
        description="also run the Verifier service: re-execute other providers' streams on this node's models "
        "(audits routers ask for), vote in duels, serve on appeal committees",
    )
    stake: int = Field(
        50,
        ge=0,
        description="credits locked as stake at start (at most what the account holds): busy peers offload to "
        "providers in proportion to stake, and a failed check or a lost duel burns part of it",
    )
    judge_method: Literal["likelihood", "llm"] = Field(
        "likelihood",
        description="how this node votes in duels when its engine cannot re-execute the answers (otherwise the "
        "side that fails re-execution loses): the reference model's likelihood of each answer, or the model "
        "asked which answer is better (services/verifier/judging.py)",
    )
    offload: bool = Field(
        True, description="pass requests on to a peer with a free slot instead of queueing them when every slot is busy"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> InferenceConfig:
        names = [model.name for model in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return self
