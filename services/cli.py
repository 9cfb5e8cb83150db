"""The ``swarmserve`` command: one entry point for every service and tool.

Each service command takes ``--config FILE`` (optional: defaults apply without one) and
``--listen HOST:PORT`` to override the address it serves on.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from swarmserve import __version__, native
from swarmserve.chain import ChainState, sign_transaction
from swarmserve.chain.audit import audit_replica
from swarmserve.chain.committee import valid_consensus_address
from swarmserve.client import GenerationResult, check_openai_receipt, generate
from swarmserve.config import ENV_PREFIX, NodeConfig, load_config
from swarmserve.keys import NodeKeys
from swarmserve.swarm import OPERATOR_CREDITS, OPERATOR_STAKE, LocalSwarm, SwarmError
from swarmserve.telemetry import configure_logging
from swarmserve.v1 import chain_pb2, chain_pb2_grpc, common_pb2, verifier_pb2, verifier_pb2_grpc

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
    if getattr(args, "http", None):
        environ[f"{ENV_PREFIX}HTTP_LISTEN"] = args.http
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
    pieces = f" in {len(result.segments)} segments (resumed after a failure)" if len(result.segments) > 1 else ""
    print(
        f"receipt     verified: signed by the serving node, co-signed by the router, and its hash chain "
        f"commits to exactly the {len(result.token_ids)} tokens received{pieces} "
        f"(model {receipt.model_digest.hex()[:16]}...)",
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
            allow_audit=args.allow_audit,
            on_text=show,
        )
    )
    _print_summary(result)
    return 0


def _local_swarm(data_dir: Path, ports_from: int, **options: Any) -> LocalSwarm:
    return LocalSwarm(data_dir, ports_from=ports_from, routers=2, **options)


def _describe(swarm: LocalSwarm) -> str:
    operators = "; ".join(f"{name}: {', '.join(nodes)}" for name, nodes in swarm.operators.items())
    return (
        f"{len(swarm.relays)} relays, {len(swarm.inference)} inference nodes, {len(swarm.routers)} routers"
        f" ({', '.join(r.listen for r in swarm.routers)}), each joining by gossip through one seed ({swarm.seed});"
        f" accounts: {operators}"
    )


async def _up(data_dir: Path, ports_from: int) -> None:
    swarm = _local_swarm(data_dir, ports_from)
    router = swarm.router
    print(f"starting a local swarm: {_describe(swarm)}; logs in {data_dir / 'logs'}", flush=True)
    await swarm.start()
    print(f'router ready at {router}; try: swarmserve generate "Hello" --router {router}', flush=True)
    print(f"OpenAI-compatible API at {swarm.url}/v1; try:\n{_curl_line(swarm.url)}", flush=True)
    others = ", ".join(f"http://{listen}/metrics" for listen in swarm.metrics.values())
    print(f"dashboard at {swarm.url}/; Prometheus metrics at {swarm.url}/metrics and {others}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("stopping the swarm", flush=True)
    await swarm.stop()


def _curl_line(url: str) -> str:
    body = json.dumps({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def _up_command(args: argparse.Namespace) -> int:
    asyncio.run(_up(Path(args.data_dir), args.ports_from))
    return 0


async def _demo(data_dir: Path, ports_from: int, prompt: str) -> None:
    # Round-robin, so that each router's few requests reach both operators' nodes, and a price
    # of a credit per generated token, so that the payments show.
    round_robin = {"SWARMSERVE_DISPATCH": "round-robin"}
    price = {"SWARMSERVE_PRICE__CREDITS_PER_1K_COMPLETION_TOKENS": "1000"}
    swarm = _local_swarm(
        data_dir,
        ports_from,
        node_env={"router-1": round_robin, "router-2": round_robin},
        inference_env=price,
    )
    router = swarm.router
    print(f"==> starting a local swarm on loopback: {_describe(swarm)}", flush=True)
    started = time.monotonic()
    await swarm.start()
    try:
        print(f"==> swarm ready in {time.monotonic() - started:.1f} s", flush=True)
        await _demo_chain(swarm)
        before = _settled(swarm)  # a data directory kept from an earlier run holds its settlements
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
        await _demo_openai(swarm)
        await _demo_verification(swarm, prompt, result)
        await _demo_credits(swarm, before)
        await _demo_failover(swarm, prompt)
    finally:
        print("==> stopping the swarm", flush=True)
        await swarm.stop()


_KILL_AT = 24  # tokens of the demo's answer before its serving node is killed


async def _demo_failover(swarm: LocalSwarm, prompt: str) -> None:
    """Kills the node serving an answer mid-stream (SIGKILL): the router resumes the stream on
    the other node from the tokens delivered, and the answer reads on."""
    print(f"==> the same prompt again; the serving node is killed (SIGKILL) after {_KILL_AT} tokens:\n", flush=True)
    arrivals: list[float] = []
    killed: list[str] = []

    def show(text: str) -> None:
        arrivals.append(time.monotonic())
        print(text, end="", flush=True)
        if len(arrivals) == _KILL_AT and not killed:
            killed.append("pending")

    async def killer() -> None:
        while not killed:
            await asyncio.sleep(0.005)
        name = await swarm.generating()
        swarm.signal(name, signal.SIGKILL)
        killed[0] = name
        print(f" [{name} killed] ", end="", flush=True)

    kill = asyncio.create_task(killer())
    result = await generate(swarm.router, prompt, model=DEFAULT_MODEL, hops=3, max_tokens=96, on_text=show)
    await kill
    print()
    summary = result.summary
    assert summary is not None
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    cut = result.segments[0].token_count if len(result.segments) > 1 else 0
    print(
        f"resumed     {len(result.segments) - 1} time(s): tokens 0-{cut - 1} by {killed[0]} (its last signed "
        f"checkpoint), {cut}-{len(result.token_ids) - 1} by {summary.served_by[:16]}... through new relays; the "
        f"chained receipt checked (swarmserve.client.check_summary); longest gap between tokens "
        f"{max(gaps, default=0) * 1000:.0f} ms (median {statistics.median(gaps) * 1000 if gaps else 0:.0f} ms)",
        flush=True,
    )


async def _demo_openai(swarm: LocalSwarm) -> None:
    """One question through the router's OpenAI-compatible API, as any OpenAI client asks it."""
    print(f"==> the same swarm through the OpenAI-compatible API at {swarm.url}/v1 (curl or any OpenAI SDK):")
    print(f"    {_curl_line(swarm.url)}", flush=True)
    question = [{"role": "user", "content": "Name a colour."}]
    body = {"model": DEFAULT_MODEL, "messages": question, "max_tokens": 16, "temperature": 0}

    def ask() -> dict[str, Any]:
        request = urllib.request.Request(
            f"{swarm.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer: dict[str, Any] = json.load(reply)
            return answer

    answer = await asyncio.to_thread(ask)
    text = answer["choices"][0]["message"]["content"]
    check_openai_receipt(answer["swarmserve"], text)
    print(
        f"    answer {text.strip()!r}, served by {answer['swarmserve']['served_by'][:16]}... through"
        f" {answer['swarmserve']['hops']} relays; its receipt checked (swarmserve.client.check_openai_receipt)",
        flush=True,
    )
    with urllib.request.urlopen(f"{swarm.url}/metrics", timeout=10) as reply:
        served = [
            line for line in reply.read().decode().splitlines() if line.startswith("swarmserve_router_requests_total")
        ]
    print(f"    the router's Prometheus metrics ({swarm.url}/metrics): {'; '.join(served)}", flush=True)
    print(f"    `swarmserve up` keeps a swarm running with its live dashboard at {swarm.url}/", flush=True)


async def _demo_verification(swarm: LocalSwarm, prompt: str, result: GenerationResult) -> None:
    """Has another inference node (a verifier) re-execute the demo's stream."""
    assert result.summary is not None and result.receipt is not None
    check = verifier_pb2.CheckReceiptRequest(
        receipt=result.summary.receipt, token_ids=result.token_ids, token_texts=result.token_texts
    )
    check.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content=prompt)
    for node in swarm.inference:
        async with aio.insecure_channel(node.listen) as channel:
            try:
                signed = await verifier_pb2_grpc.VerifierStub(channel).CheckReceipt(check, timeout=120)
            except aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                    continue  # the node that served it: verifiers never check their own streams
                raise
        verdict = verifier_pb2.Verdict.FromString(signed.verdict)
        own = swarm.operators["operator-1"]  # router 1's account
        served_by_own = any(native.node_id(swarm.identity_key(n)) == result.summary.served_by for n in own)
        where = (
            "served by router 1's own operator: a check of one's own service counts for nothing on the chain"
            if served_by_own
            else "paid for by another operator: the chain records the verdict, its lottery having drawn this"
            " verifier's account (here the only other one with stake)"
        )
        print(
            f"==> verified by {node.name} (re-executed on its own copy of the model, token by token): "
            f"{verifier_pb2.VerdictOutcome.Name(verdict.outcome).removeprefix('VERDICT_OUTCOME_')}, "
            f"{verdict.score:.0%} of tokens plausible; the stream was {where}",
            flush=True,
        )
        break


async def _demo_chain(swarm: LocalSwarm) -> None:
    """The ledger's chain as router 1 follows it, once it has a block past genesis."""
    deadline = time.monotonic() + 60
    async with aio.insecure_channel(swarm.router) as channel:
        stub = chain_pb2_grpc.ChainStub(channel)
        while (status := await stub.GetStatus(chain_pb2.GetChainStatusRequest(), timeout=10)).height < 1:
            if time.monotonic() > deadline:
                raise SwarmError("the ledger's validators decided no block in 60 s")
            await asyncio.sleep(0.2)
    print(
        f"==> ledger chain {status.chain_id.hex()[:16]}: height {status.height}, {len(status.validators)} validators"
        f" ({', '.join(v.address for v in status.validators)}), state root {status.state_root.hex()[:16]}",
        flush=True,
    )


def _settled(swarm: LocalSwarm) -> dict[tuple[bytes, bytes], int]:
    """Credits settled so far per (payer, payee), in router 1's replica."""
    state = ChainState.open_replica(swarm.data_dir / swarm.routers[0].name)
    try:
        return {(payer, payee): credits for payer, payee, credits, _ in state.settlements()}
    finally:
        state.close()


async def _demo_credits(swarm: LocalSwarm, before: dict[tuple[bytes, bytes], int]) -> None:
    """Each router sends two short requests (round-robin: one to each operator's node): serving
    one's own account is free, the other operator is paid in tokens bought by cheque, and the
    cheques settle on the chain at the next epoch. Shows what this run settled and the accounts."""
    names = {swarm.identity_key(node): node for nodes in swarm.operators.values() for node in nodes}
    by_node_id = {native.node_id(key): name for key, name in names.items()}
    print("==> credits: each router sends two short requests; its own operator's node serves for free,", flush=True)
    print(
        "    the other operator's is paid in unlinkable tokens worth each request's bound (a credit per token"
        " it may generate), bought by cheque, settled on the chain per epoch",
        flush=True,
    )
    for index, router in enumerate(swarm.routers):
        for question in ("Name a colour.", "Name a fruit."):
            answer = await generate(router.listen, question, model=DEFAULT_MODEL, hops=1, max_tokens=8 * (index + 1))
            assert answer.summary is not None
            served_by = by_node_id.get(answer.summary.served_by, answer.summary.served_by[:16])
            print(f"    {router.name} -> {served_by}: {answer.text.strip()!r}", flush=True)
    state = ChainState.open_replica(swarm.data_dir / swarm.routers[0].name)
    try:

        def paid_now() -> list[tuple[bytes, bytes, int, int]]:
            return [
                (payer, payee, credits - before.get((payer, payee), 0), epoch)
                for payer, payee, credits, epoch in state.settlements()
                if credits > before.get((payer, payee), 0)
            ]

        deadline = time.monotonic() + 60
        while len(paid_now()) < len(swarm.routers) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        print(f"==> settled on the chain (height {state.height}, epoch {state.epoch_of(state.height)}):", flush=True)
        for payer, payee, credits, epoch in paid_now():
            print(
                f"    {names.get(payer, payer.hex()[:16])} paid {names.get(payee, payee.hex()[:16])}"
                f" {credits} credits (settled in epoch {epoch})",
                flush=True,
            )
        verdicts = state.reputation_events(0)[1]
        print(f"    verdicts recorded on the chain: {len(verdicts)}", flush=True)
        for operator in swarm.operators:
            account = state.account(swarm.identity_key(operator))
            print(
                f"    {operator}: {account.available} available + {account.bonded} bonded"
                f" (genesis: {OPERATOR_CREDITS} + {OPERATOR_STAKE})",
                flush=True,
            )
    finally:
        state.close()


def _demo_command(args: argparse.Namespace) -> int:
    asyncio.run(_demo(Path(args.data_dir), args.ports_from, args.prompt))
    return 0


def _health(args: argparse.Namespace) -> int:
    """gRPC health of a node (a container's HEALTHCHECK): 0 if SERVING, 1 otherwise."""

    if args.address is None:  # the node's own listen address (a container's HEALTHCHECK)
        host, _, port = os.environ.get(f"{ENV_PREFIX}SERVER__LISTEN", "").rpartition(":")
        if not port:
            print(f"swarmserve health: give HOST:PORT (or set {ENV_PREFIX}SERVER__LISTEN)", file=sys.stderr)
            return 2
        args.address = f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"

    async def check() -> str:
        async with aio.insecure_channel(args.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    try:
        status = asyncio.run(check())
    except grpc.aio.AioRpcError as error:
        print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


def _keys(args: argparse.Namespace) -> int:
    keys = NodeKeys.load_or_create(Path(args.data_dir))
    print(f"node id:       {keys.identity.node_id}")
    print(f"identity key:  {keys.identity.public_key.hex()}")
    print(f"key file in:   {keys.directory}")
    print("onion keys:    made at every start, kept in memory only, replaced every hour")
    return 0


def _output(args: argparse.Namespace, fields: dict[str, Any]) -> None:
    """One record, as JSON (``--json``) or as aligned lines."""
    if args.json:
        print(json.dumps(fields))
        return
    width = max(map(len, fields)) + 2
    for name, value in fields.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name + ':':{width}}{shown}")


def _replica(args: argparse.Namespace) -> ChainState:
    return ChainState.open_replica(Path(args.data_dir))


def _ledger_status(args: argparse.Namespace) -> int:
    keys = NodeKeys.load_or_create(Path(args.data_dir))
    state = _replica(args)
    try:
        epoch = state.epoch_of(state.height + 1)  # the epoch of the next block: its committee decides it
        committee = state.committee_of(epoch)
        _output(
            args,
            {
                "chain_id": state.chain_id.hex(),
                "height": state.height,
                "epoch": epoch,
                "state_root": state.state_root.hex(),
                "validators": [f"{key.hex()[:16]}@{address}" for key, address in committee],
                "role": "validator" if keys.identity.public_key in dict(committee) else "follower",
                "candidacy": state.candidates().get(keys.identity.public_key),
                "account": state.account_of(keys.identity.public_key).hex(),
            },
        )
    finally:
        state.close()
    return 0


def _hex_key(value: str, option: str) -> bytes:
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"{option} must be a 32-byte identity key in hex")
    return key


def _account_key(args: argparse.Namespace) -> bytes:
    if not args.account:
        return NodeKeys.load_or_create(Path(args.data_dir)).identity.public_key
    return _hex_key(args.account, "--account")


def _ledger_balance(args: argparse.Namespace) -> int:
    key = _account_key(args)
    state = _replica(args)
    try:
        account = state.account(key)
        height = state.height
    finally:
        state.close()
    _output(
        args,
        {
            "key": key.hex(),
            "account": account.account_key.hex(),
            "available": account.available,
            "bonded": account.bonded,
            "unbonding": account.unbonding,
            "nonce": account.nonce,
            "height": height,
        },
    )
    return 0


async def _submit_and_wait(
    stub: chain_pb2_grpc.ChainAsyncStub, identity: native.Identity, timeout_s: float, **action: Message
) -> tuple[chain_pb2.GetAccountResponse, chain_pb2.GetAccountResponse]:
    """Signs one transaction of ``identity``'s, submits it and waits until its nonce is spent in
    a block; returns the account before and after."""
    status = await stub.GetStatus(chain_pb2.GetChainStatusRequest(), timeout=10)
    before = await stub.GetAccount(chain_pb2.GetAccountRequest(account_key=identity.public_key), timeout=10)
    raw = sign_transaction(identity, status.chain_id, before.nonce + 1, **action)
    await stub.Submit(chain_pb2.SubmitTransactionRequest(transaction=chain_pb2.SignedTransaction.FromString(raw)))
    deadline = time.monotonic() + timeout_s
    while True:
        after = await stub.GetAccount(chain_pb2.GetAccountRequest(account_key=identity.public_key), timeout=10)
        if after.nonce > before.nonce:
            return before, after
        if time.monotonic() > deadline:
            raise TimeoutError(f"the transaction was not in a block after {timeout_s:.0f} s")
        await asyncio.sleep(0.2)


async def _transfer(args: argparse.Namespace) -> dict[str, Any]:
    identity = NodeKeys.load_or_create(Path(args.data_dir)).identity
    recipient = _hex_key(args.to, "--to")
    if args.credits < 1:
        raise ValueError("--credits must be positive")
    async with aio.insecure_channel(args.via) as channel:
        stub = chain_pb2_grpc.ChainStub(channel)
        held = await stub.GetAccount(chain_pb2.GetAccountRequest(account_key=identity.public_key), timeout=10)
        if held.available < args.credits:
            raise ValueError(f"the account holds {held.available} available credits, fewer than {args.credits}")
        transfer = chain_pb2.TransferCredits(recipient_key=recipient, credits=args.credits)
        before, after = await _submit_and_wait(stub, identity, args.timeout, transfer=transfer)
    applied = after.available <= before.available - args.credits
    return {
        "from": identity.public_key.hex(),
        "to": recipient.hex(),
        "credits": args.credits,
        "applied": applied,
        "height": after.height,
        "available": after.available,
    }


def _ledger_transfer(args: argparse.Namespace) -> int:
    result = asyncio.run(_transfer(args))
    _output(args, result)
    return 0 if result["applied"] else 2


async def _candidacy(args: argparse.Namespace) -> dict[str, Any]:
    identity = NodeKeys.load_or_create(Path(args.data_dir)).identity
    address = "" if args.withdraw else args.address
    if not args.withdraw and not valid_consensus_address(args.address or ""):
        raise ValueError("give --address IP:PORT (an IP literal and the consensus port), or --withdraw")
    async with aio.insecure_channel(args.via) as channel:
        stub = chain_pb2_grpc.ChainStub(channel)
        _, after = await _submit_and_wait(
            stub, identity, args.timeout, candidacy=chain_pb2.ValidatorCandidacy(address=address)
        )
    return {"node": identity.public_key.hex(), "address": address, "height": after.height}


def _ledger_validate(args: argparse.Namespace) -> int:
    _output(args, asyncio.run(_candidacy(args)))
    return 0


def _ledger_verify(args: argparse.Namespace) -> int:
    state = _replica(args)
    try:
        report = audit_replica(state)
    finally:
        state.close()
    _output(
        args,
        {
            "height": report.height,
            "replayed": report.replayed,
            "certificates": report.certificates,
            "unproven_tip": report.unproven_tip,
            "problems": report.problems,
            "ok": not report.problems,
        },
    )
    return 0 if not report.problems else 2


def _add_service(commands: Any, name: str, help_text: str, run: Any) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
    command.add_argument("--config", help="YAML config file (default: built-in defaults)")
    command.add_argument("--listen", help="HOST:PORT to serve on (overrides the config)")
    command.add_argument(
        "--seed", action="append", help="HOST:PORT of a swarm member to join through (repeatable; overrides the config)"
    )
    command.set_defaults(run=run)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"swarmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_service(commands, "inference", "run an inference node (serves models)", _inference)
    _add_service(commands, "relay", "run an onion relay", _relay)
    router = _add_service(commands, "router", "run a router (the client entry point)", _router)
    router.add_argument(
        "--http", help="HOST:PORT for the OpenAI-compatible API, dashboard and metrics (overrides the config)"
    )

    gen = commands.add_parser("generate", help="send a prompt to a router and print the tokens as they stream")
    gen.add_argument("prompt")
    gen.add_argument("--router", default=DEFAULT_ROUTER, help=f"router address (default: {DEFAULT_ROUTER})")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--hops", type=int, default=None, help="relays on the path (default: the router's, 3)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="complete the prompt as text, not as a chat turn")
    gen.add_argument(
        "--allow-audit",
        action="store_true",
        help="let a verifier re-execute the answer (it sees the prompt; if the provider cheated, the prompt is "
        "published on the ledger as the evidence)",
    )
    gen.set_defaults(run=_generate)

    up = commands.add_parser("up", help="run a local swarm on loopback until Ctrl-C")
    up.add_argument("--data-dir", default="data/swarm")
    up.add_argument(
        "--ports-from", type=int, default=7000, help="first router's port; the other nodes use the next ten"
    )
    up.set_defaults(run=_up_command)

    demo = commands.add_parser("demo", help="start a local swarm, stream one prompt through 3 relays, stop")
    demo.add_argument("--data-dir", default="data/swarm")
    demo.add_argument("--ports-from", type=int, default=7000, help="first router's port; the nodes use the next ten")
    demo.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    demo.set_defaults(run=_demo_command)
    health = commands.add_parser("health", help="ask a node's gRPC health service; exit 0 if it is SERVING")
    health.add_argument(
        "address", nargs="?", help=f"HOST:PORT of the node (default: this node's {ENV_PREFIX}SERVER__LISTEN)"
    )
    health.add_argument("--service", default="", help="a service name (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    health.set_defaults(run=_health)
    keys = commands.add_parser("keys", help="create (if missing) and show this node's identity and onion keys")
    keys.add_argument("--data-dir", default="data", help="node data directory (default: ./data)")
    keys.set_defaults(run=_keys)

    ledger = commands.add_parser("ledger", help="the credit ledger's chain, as this node's replica holds it")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)

    def ledger_command(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        command = ledger_commands.add_parser(name, help=help_text)
        command.add_argument(
            "--data-dir",
            default="data",
            help="the node whose key and replica to use (`swarmserve up`: data/swarm/NODE)",
        )
        command.add_argument("--json", action="store_true", help="one JSON object, for scripts")
        command.set_defaults(run=run)
        return command

    ledger_command("status", "height, epoch, validators, this node's role, state root", _ledger_status)
    balance = ledger_command("balance", "an account's credits and stake", _ledger_balance)
    balance.add_argument("--account", help="identity key in hex (default: this node's)")
    transfer = ledger_command(
        "transfer", "send credits from this key's account, and wait for the block", _ledger_transfer
    )
    transfer.add_argument("--to", required=True, help="recipient identity key in hex")
    transfer.add_argument("--credits", type=int, required=True)
    transfer.add_argument("--via", default=DEFAULT_ROUTER, help=f"a node of the swarm (default: {DEFAULT_ROUTER})")
    transfer.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the block")
    validate = ledger_command(
        "validate",
        "offer this node as a validator from the next epoch on (its account's bonded stake decides), or withdraw",
        _ledger_validate,
    )
    validate.add_argument("--address", help="this node's consensus address, IP:PORT")
    validate.add_argument("--withdraw", action="store_true", help="withdraw the offer")
    validate.add_argument("--via", default=DEFAULT_ROUTER, help=f"a node of the swarm (default: {DEFAULT_ROUTER})")
    validate.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the block")
    ledger_command("verify", "replay the chain, checking every block's certificate and state root", _ledger_verify)
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
