"""Configuration loading: defaults, YAML, environment overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmserve.config import ConfigError, NodeConfig, load_config, parse_listen_address


def test_defaults_need_no_file() -> None:
    config = load_config(NodeConfig, None, environ={})
    assert config.server.listen == "127.0.0.1:0"
    assert config.log.format == "auto"


def test_yaml_then_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("data_dir: /srv/node\nserver:\n  listen: 0.0.0.0:7000\n  grace_period_s: 3\n")
    config = load_config(
        NodeConfig,
        path,
        environ={
            "SWARMSERVE_SERVER__LISTEN": "[::1]:7001",
            "SWARMSERVE_LOG__LEVEL": "debug",
            "OTHER": "x",
        },
    )
    assert config.data_dir == Path("/srv/node")
    assert config.server.listen == "[::1]:7001"
    assert config.server.grace_period_s == 3
    assert config.log.level == "debug"


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("server:\n  lisen: 1.2.3.4:5\n", {}, "server.lisen: Extra inputs are not permitted"),
        ("server:\n  listen: nowhere\n", {}, "server.listen: Value error, expected HOST:PORT"),
        ("server:\n  listen: h:70000\n", {}, "outside 0..65535"),
        ("log:\n  level: loud\n", {}, "log.level"),
        ("", {"SWARMSERVE_SERVER__GRACE_PERIOD_S": "-1"}, "server.grace_period_s"),
        ("- a list\n", {}, "must hold a mapping"),
        ("server: [\n", {}, "not valid YAML"),
        ("server: 5\n", {"SWARMSERVE_SERVER__LISTEN": "h:1"}, "server is not a section"),
    ],
)
def test_bad_configuration_is_named(tmp_path: Path, text: str, environ: dict[str, str], expected: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_config(NodeConfig, path, environ=environ)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(NodeConfig, tmp_path / "absent.yaml", environ={})


def test_listen_address_parsing() -> None:
    assert parse_listen_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_listen_address("[::1]:0") == ("[::1]", 0)
    with pytest.raises(ValueError):
        parse_listen_address(":80")
