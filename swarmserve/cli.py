"""The ``swarmserve`` command: one entry point for every service and tool.

Each service command takes ``--config FILE`` (optional: defaults apply without one) and
``--listen HOST:PORT`` to override the address it serves on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio
from pydantic import BaseModel

from swarmserve import __version__, native
from swarmserve.client import GenerationResult, generate
from swarmserve.config import ENV_PREFIX, NodeConfig, load_config
from swarmserve.keys import NodeKeys
from swarmserve.ledger import LedgerReplica
from swarmserve.swarm import LocalSwarm
from swarmserve.telemetry import configure_logging
from swarmserve.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc, verifier_pb2, verifier_pb2_grpc

DEFAULT_ROUTER = "127.0.0.1:7000"
DEFAULT_MODEL = "smollm2-135m-instruct"

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _service_config(model: type[ConfigT], args: argparse.Namespace) -> ConfigT:
    """Loads a service's config; ``--listen`` and ``--seed`` win over the file and the
    environment, and are validated like any other setting."""
    environ = dict(os.environ)
    if args.listen:
        environ[f"{ENV_PREFIX}SERVER__LISTEN"] = args.listen
    if args.seed:
        environ[f"{ENV_PREFIX}GOSSIP__SEEDS"] = "[" + ", ".join(args.seed) + "]"
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


def _relay(args: argparse.Namespace) -> int:
    from services.relay.config import RelayConfig
    from services.relay.node import RelayNode

    asyncio.run(RelayNode(_service_config(RelayConfig, args)).run())
    return 0


def _router(args: argparse.Namespace) -> int:
    from services.router.config import RouterConfig
    from services.router.node import RouterNode

    asyncio.run(RouterNode(_service_config(RouterConfig, args)).run())
    return 0


def _print_summary(result: GenerationResult, stream: Any = sys.stderr) -> None:
    summary, receipt = result.summary, result.receipt
    assert summary is not None and receipt is not None
    print(file=stream)
    print(f"served by   {summary.served_by[:16]}... through {summary.hops} relays", file=stream)
    print(
        f"receipt     verified: signed by the serving node, co-signed by the router, and its hash chain "
        f"commits to exactly the {receipt.token_count} tokens received (model {receipt.model_digest.hex()[:16]}...)",
        file=stream,
    )
    print(
        f"timing      time to first token {result.time_to_first_token_s * 1000:.0f} ms, "
        f"{len(result.token_ids)} tokens in {result.total_s:.2f} s ({result.tokens_per_second:.1f} tokens/s)",
        file=stream,
    )


def _generate(args: argparse.Namespace) -> int:
    def show(text: str) -> None:
        print(text, end="", flush=True)

    result = asyncio.run(
        generate(
            args.router,
            args.prompt,
            model=args.model,
            hops=args.hops,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            raw=args.raw,
            on_text=show,
        )
    )
    _print_summary(result)
    return 0


async def _up(data_dir: Path, ports_from: int) -> None:
    swarm = LocalSwarm(data_dir, ports_from=ports_from)
    router = swarm.router
    print(
        f"starting a local swarm (3 relays, 2 inference nodes, 1 router), gossiping through one seed"
        f" ({swarm.seed}); logs in {data_dir / 'logs'}",
        flush=True,
    )
    await swarm.start()
    print(f'router ready at {router}; try: swarmserve generate "Hello" --router {router}', flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("stopping the swarm", flush=True)
    await swarm.stop()


def _up_command(args: argparse.Namespace) -> int:
    asyncio.run(_up(Path(args.data_dir), args.ports_from))
    return 0


async def _demo(data_dir: Path, ports_from: int, prompt: str) -> None:
    swarm = LocalSwarm(data_dir, ports_from=ports_from)
    router = swarm.router
    print(
        f"==> starting a local swarm on loopback: 3 relays, 2 inference nodes, 1 router ({router}),"
        f" each joining by gossip through one seed ({swarm.seed})",
        flush=True,
    )
    started = time.monotonic()
    await swarm.start()
    try:
        print(f"==> swarm ready in {time.monotonic() - started:.1f} s", flush=True)
        print(f"==> prompt, through a 3-relay onion circuit: {prompt!r}\n", flush=True)
        result = await generate(
            router,
            prompt,
            model=DEFAULT_MODEL,
            hops=3,
            max_tokens=96,
            on_text=lambda t: print(t, end="", flush=True),
        )
        print()
        _print_summary(result, sys.stdout)
        await _demo_verification(swarm, prompt, result)
    finally:
        print("==> stopping the swarm", flush=True)
        await swarm.stop()


async def _demo_verification(swarm: LocalSwarm, prompt: str, result: GenerationResult) -> None:
    """Has another inference node (a verifier) re-execute the demo's stream, then shows the
    credits in the router's ledger replica: the router paid the provider for the checked tokens."""
    assert result.summary is not None and result.receipt is not None
    check = verifier_pb2.CheckReceiptRequest(
        receipt=result.summary.receipt, token_ids=result.token_ids, token_texts=result.token_texts
    )
    check.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=prompt)
    provider = result.receipt.node_key
    router_key = result.summary.receipt.cosignatures[0].signer_key
    verifier_key = b""
    for node in swarm.inference:
        async with aio.insecure_channel(node.listen) as channel:
            try:
                signed = await verifier_pb2_grpc.VerifierStub(channel).CheckReceipt(check, timeout=120)
            except aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                    continue  # the node that served it: verifiers never check their own streams
                raise
        verdict = verifier_pb2.Verdict.FromString(signed.verdict)
        verifier_key = signed.verifier_key
        print(
            f"==> verified by {node.name} (re-executed on its own copy of the model, token by token): "
            f"{verifier_pb2.VerdictOutcome.Name(verdict.outcome).removeprefix('VERDICT_OUTCOME_')}, "
            f"{verdict.score:.0%} of tokens plausible; signed verdict recorded in its ledger",
            flush=True,
        )
        break
    async with aio.insecure_channel(swarm.router) as channel:
        ledger = ledger_pb2_grpc.LedgerStub(channel)
        print("==> credits in the router's ledger replica (available + staked):", flush=True)
        for role, key in (("provider", provider), ("router (paid)", router_key), ("verifier", verifier_key)):
            if not key:
                continue
            balance = await ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_key=key), timeout=10)
            print(f"    {role:14} {native.node_id(key)[:16]}  {balance.available} + {balance.staked}", flush=True)


def _demo_command(args: argparse.Namespace) -> int:
    asyncio.run(_demo(Path(args.data_dir), args.ports_from, args.prompt))
    return 0


def _keys(args: argparse.Namespace) -> int:
    keys = NodeKeys.load_or_create(Path(args.data_dir))
    print(f"node id:       {keys.identity.node_id}")
    print(f"identity key:  {keys.identity.public_key.hex()}")
    print(f"onion key:     {keys.onion.public_key.hex()}")
    print(f"key files in:  {keys.directory}")
    return 0


def _ledger_replica(args: argparse.Namespace) -> LedgerReplica:
    path = Path(args.data_dir) / "ledger.sqlite3"
    if not path.is_file():
        raise FileNotFoundError(f"no ledger replica at {path}")
    return LedgerReplica(path)


def _ledger_balance(args: argparse.Namespace) -> int:
    replica = _ledger_replica(args)
    try:
        account = (
            bytes.fromhex(args.account)
            if args.account
            else NodeKeys.load_or_create(Path(args.data_dir)).identity.public_key
        )
        if len(account) != 32:
            raise ValueError("--account must be a 32-byte identity key in hex")
        balance = replica.balance(account)
    finally:
        replica.close()
    print(f"account:    {account.hex()}")
    print(f"available:  {balance.available}")
    print(f"staked:     {balance.staked}")
    print(f"entries:    {balance.entries}")
    if balance.frozen:
        print("frozen:     yes (the account signed two different entries at one sequence)")
    return 0


def _ledger_verify(args: argparse.Namespace) -> int:
    replica = _ledger_replica(args)
    try:
        report = replica.verify()
    finally:
        replica.close()
    for problem in report.problems:
        print(f"problem: {problem}")
    verdict = "OK" if not report.problems else f"{len(report.problems)} problems"
    print(f"{report.entries} entries by {report.authors} authors: every signature and link checked: {verdict}")
    return 0 if not report.problems else 2


def _add_service(commands: Any, name: str, help_text: str, run: Any) -> None:
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--config", help="YAML config file (default: built-in defaults)")
    command.add_argument("--listen", help="HOST:PORT to serve on (overrides the config)")
    command.add_argument(
        "--seed", action="append", help="HOST:PORT of a swarm member to join through (repeatable; overrides the config)"
    )
    command.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"swarmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_service(commands, "inference", "run an inference node (serves models)", _inference)
    _add_service(commands, "relay", "run an onion relay", _relay)
    _add_service(commands, "router", "run a router (the client entry point)", _router)

    gen = commands.add_parser("generate", help="send a prompt to a router and print the tokens as they stream")
    gen.add_argument("prompt")
    gen.add_argument("--router", default=DEFAULT_ROUTER, help=f"router address (default: {DEFAULT_ROUTER})")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--hops", type=int, default=None, help="relays on the path (default: the router's, 3)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="complete the prompt as text, not as a chat turn")
    gen.set_defaults(run=_generate)

    up = commands.add_parser("up", help="run a local swarm on loopback until Ctrl-C")
    up.add_argument("--data-dir", default="data/swarm")
    up.add_argument(
        "--ports-from", type=int, default=7000, help="router port; relays and inference nodes use the next five"
    )
    up.set_defaults(run=_up_command)

    demo = commands.add_parser("demo", help="start a local swarm, stream one prompt through 3 relays, stop")
    demo.add_argument("--data-dir", default="data/swarm")
    demo.add_argument("--ports-from", type=int, default=7000, help="router port; the nodes use the next five")
    demo.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    demo.set_defaults(run=_demo_command)
    keys = commands.add_parser("keys", help="create (if missing) and show this node's identity and onion keys")
    keys.add_argument("--data-dir", default="data", help="node data directory (default: ./data)")
    keys.set_defaults(run=_keys)

    ledger = commands.add_parser("ledger", help="inspect this node's credit-ledger replica")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    balance = ledger_commands.add_parser("balance", help="an account's balance, derived from the log")
    balance.add_argument("--data-dir", default="data", help="node data directory (default: ./data)")
    balance.add_argument("--account", help="identity key in hex (default: this node's)")
    balance.set_defaults(run=_ledger_balance)
    verify = ledger_commands.add_parser("verify", help="replay the whole log, checking every signature and link")
    verify.add_argument("--data-dir", default="data", help="node data directory (default: ./data)")
    verify.set_defaults(run=_ledger_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except grpc.aio.AioRpcError as error:
        print(f"swarmserve: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except Exception as error:  # one clear line for operators, not a traceback
        print(f"swarmserve: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
