"""Configuration loading: defaults, YAML, environment overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.relay.config import RelayConfig
from swarmserve import native
from swarmserve.config import ConfigError, NodeConfig, load_config, parse_listen_address
from swarmserve.keys import NodeKeys


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


def test_an_identity_key_from_the_environment_is_the_nodes_key_and_never_replaced(tmp_path: Path) -> None:
    """SWARMSERVE_IDENTITY_KEY (a Kubernetes secretKeyRef) as PEM: taken as written (YAML would
    fold its lines), hidden from the config's repr, written to data_dir/identity.key on first
    start; a data dir that already holds another key, or a key that is no PEM, is refused."""
    pem = native.Identity.generate().to_pem()
    config = load_config(RelayConfig, None, {"SWARMSERVE_IDENTITY_KEY": pem, "SWARMSERVE_DATA_DIR": str(tmp_path)})
    assert config.identity_pem() == pem
    assert "PRIVATE" not in repr(config)
    keys = NodeKeys.load_or_create(config.data_dir, config.identity_pem())
    assert keys.identity.public_key == native.Identity.from_pem(pem).public_key
    assert native.Identity.load(tmp_path / "identity.key").public_key == keys.identity.public_key
    assert (
        NodeKeys.load_or_create(config.data_dir, config.identity_pem()).identity.public_key == keys.identity.public_key
    )
    with pytest.raises(native.KeyFileError, match="another identity key"):
        NodeKeys.load_or_create(config.data_dir, native.Identity.generate().to_pem())
    with pytest.raises(native.InvalidKeyError):
        NodeKeys.load_or_create(
            tmp_path / "other", "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
        )
