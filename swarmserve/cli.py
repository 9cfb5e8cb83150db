"""The ``swarmserve`` command. Service subcommands (router, relay, inference, up, generate)
arrive with their services; this module is their one entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from swarmserve import __version__
from swarmserve.keys import NodeKeys


def _keys(args: argparse.Namespace) -> int:
    keys = NodeKeys.load_or_create(Path(args.data_dir))
    print(f"node id:       {keys.identity.node_id}")
    print(f"identity key:  {keys.identity.public_key.hex()}")
    print(f"onion key:     {keys.onion.public_key.hex()}")
    print(f"key files in:  {keys.directory}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"swarmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
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
    except Exception as error:  # one clear line for operators, not a traceback
        print(f"swarmserve: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
