"""Provider policy: validation at start-up with clear errors, serving hours, and an engine that
cannot run here failing the node's start-up instead of serving."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from services.inference.config import InferenceConfig, ModelSettings, ProviderPolicy, ServingWindow
from services.inference.emulated import EmulatedEngine
from services.inference.engine import EngineUnavailable
from services.inference.node import InferenceNode
from services.inference.service import GenerateRequest, InferenceService
from swarmserve import native
from swarmserve.config import ConfigError, ServerSettings, load_config
from swarmserve.rpc import Unavailable


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "policy:\n  default_new_tokens: 600\n  max_new_tokens: 500\n",
            "default_new_tokens (600) exceeds max_new_tokens (500)",
        ),
        ("policy:\n  accept_callers: sometimes\n", "policy.accept_callers"),
        ("models:\n  - name: a\n  - name: a\n", "repeated: a"),
        ("models:\n  - engine: tensorrt-llm\n", "tensorrt-llm needs path"),
        ("models: []\n", "models"),
        (
            "policy:\n  serving_hours:\n    - start: '25:00'\n      end: '10:00'\n",
            "policy.serving_hours.0.start",
        ),
        ("models:\n  - engine: vllm\n", "models.0.engine"),
    ],
)
def test_invalid_policies_are_refused_with_the_reason(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(InferenceConfig, path, environ={})


def test_serving_windows_including_past_midnight() -> None:
    night = ServingWindow(start=dt.time(22), end=dt.time(6))
    assert night.contains(dt.time(23, 30)) and night.contains(dt.time(1)) and not night.contains(dt.time(12))
    day = ServingWindow(start=dt.time(9), end=dt.time(17))
    assert day.contains(dt.time(9)) and not day.contains(dt.time(17))
    assert ProviderPolicy().serving_at(dt.datetime.now(dt.UTC))


def test_outside_serving_hours_is_unavailable() -> None:
    now = dt.datetime.now(dt.UTC)
    closed = ServingWindow(start=(now + dt.timedelta(hours=2)).time(), end=(now + dt.timedelta(hours=3)).time())
    service = InferenceService(
        native.Identity.generate(),
        {"emu": EmulatedEngine("emu")},
        ProviderPolicy(serving_hours=[closed]),
    )
    with pytest.raises(Unavailable, match="outside this node's serving hours"):
        service.prepare(GenerateRequest(model="emu", prompt="hello"))


async def test_unavailable_engine_fails_start_up_clearly(tmp_path: Path) -> None:
    config = InferenceConfig(
        data_dir=tmp_path,
        server=ServerSettings(listen="127.0.0.1:0"),
        models=[ModelSettings(name="big", engine="tensorrt-llm", path=tmp_path)],
    )
    node = InferenceNode(config)
    with pytest.raises(EngineUnavailable, match="tensorrt"):
        await node.start()
    missing = InferenceConfig(
        data_dir=tmp_path,
        server=ServerSettings(listen="127.0.0.1:0"),
        models=[ModelSettings(path=tmp_path / "no.gguf")],
    )
    with pytest.raises(EngineUnavailable, match="does not exist"):
        await InferenceNode(missing).start()


def test_the_documented_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "inference.yaml"
    config = load_config(InferenceConfig, example, environ={})
    assert config == InferenceConfig(), "the example documents the defaults"


def test_the_router_and_relay_examples_document_the_defaults() -> None:
    from services.relay.config import RelayConfig
    from services.router.config import RouterConfig

    examples = Path(__file__).resolve().parent.parent / "examples"
    assert load_config(RouterConfig, examples / "router.yaml", environ={}) == RouterConfig()
    assert load_config(RelayConfig, examples / "relay.yaml", environ={}) == RelayConfig()
