"""The ``swarmserve`` command: one entry point for every service and tool.

Each service command takes ``--config FILE`` (optional: defaults apply without one) and
``--listen HOST:PORT`` to override the address it serves on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from swarmserve import __version__
from swarmserve.config import ENV_PREFIX, NodeConfig, load_config
from swarmserve.keys import NodeKeys
from swarmserve.telemetry import configure_logging

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _service_config(model: type[ConfigT], args: argparse.Namespace) -> ConfigT:
    """Loads a service's config; ``--listen`` wins over the file and the environment, and is
    validated like any other setting."""
    environ = dict(os.environ)
    if args.listen:
        environ[f"{ENV_PREFIX}SERVER__LISTEN"] = args.listen
    config = load_config(model, Path(args.config) if args.config else None, environ)
    if isinstance(config, NodeConfig):
        configure_logging(config.log.level, config.log.format)
    return config


def _inference(args: argparse.Namespace) -> int:
    from services.inference.config import InferenceConfig
    from services.inference.node import InferenceNode

    config = _service_config(InferenceConfig, args)
    asyncio.run(InferenceNode(config).run())
    return 0


def _keys(args: argparse.Namespace) -> int:
    keys = NodeKeys.load_or_create(Path(args.data_dir))
    print(f"node id:       {keys.identity.node_id}")
    print(f"identity key:  {keys.identity.public_key.hex()}")
    print(f"onion key:     {keys.onion.public_key.hex()}")
    print(f"key files in:  {keys.directory}")
    return 0


def _add_service(commands: Any, name: str, help_text: str, run: Any) -> None:
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--config", help="YAML config file (default: built-in defaults)")
    command.add_argument("--listen", help="HOST:PORT to serve on (overrides the config)")
    command.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"swarmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_service(commands, "inference", "run an inference node (serves models)", _inference)
    keys = commands.add_parser(
        "keys", help="create (if missing) and show this node's identity and onion keys"
    )
    keys.add_argument("--data-dir", default="data", help="node data directory (default: ./data)")
    keys.set_defaults(run=_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one clear line for operators, not a traceback
        print(f"swarmserve: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
