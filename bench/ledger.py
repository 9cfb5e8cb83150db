"""The ledger's chain under load, and what paying for work costs on it, in one run:

1. Consensus: N validators (4, 7, 10), each its own process running a ConsensusNode (Commonware
   simplex, marshal, authenticated p2p) at the genesis defaults (a block per 500 ms, up to 256
   transactions), on loopback and with 20 ms one way between validators: each is reached
   through a TCP proxy that holds every byte 20 ms each way (this machine's kernel has no
   `tc netem`: "Specified qdisc kind is unknown"). Every validator offers signed
   transfers (the chain's real transaction format) at a fixed rate; reported: decided
   transactions per second and commit latency (submitted -> finalized at the submitting
   validator), p50/p99, with the spread over repetitions.
2. Bytes and CPU per served request: today's cheques (one cheque per request off the chain, one
   settlement per payer and provider per epoch on it) against the per-author ledger this
   replaced (a ServedWork entry carrying the co-signed receipt, per request, replicated to and
   checked by every node; its size from that entry's format, with a real receipt).
3. Settlement at scale: 10,000 providers, 200 routers, requests by a Zipf-like popularity, each
   provider settling all its payers' cheques in one transaction per epoch (as nodes do): the
   settlement transactions per epoch, the time the state machine takes to apply them (real
   ChainState, real signatures, the state root kept incrementally), against recomputing the
   root from every row at the final state in the same run, and whether one epoch's settlements
   fit in one epoch of blocks.

Writes bench/results/ledger.json and ledger.png. Run: `make bench`, or `python bench/ledger.py
--quick` for a smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from swarmserve import native  # noqa: E402
from swarmserve.chain import ChainParameters, ChainState, Genesis, GenesisAccount, GenesisValidator  # noqa: E402
from swarmserve.chain.cheques import open_cheque, sign_cheque  # noqa: E402
from swarmserve.chain.replica import CHEQUES_PER_SETTLEMENT  # noqa: E402
from swarmserve.chain.state import genesis_block  # noqa: E402
from swarmserve.chain.transactions import sign_transaction  # noqa: E402
from swarmserve.receipts import ReceiptWriter  # noqa: E402
from swarmserve.swarm import free_port_block  # noqa: E402
from swarmserve.v1 import chain_pb2, common_pb2  # noqa: E402

RESULTS = ROOT / "bench" / "results"
console = Console(stderr=True)
PARAMETERS = ChainParameters()  # the genesis defaults: what a real swarm runs


# --- 1. consensus: one validator per process ---------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One validator: submits its share of transfers at ``--rate``/s for ``--seconds``, drains
    and acknowledges finalized blocks, and writes when each of its transactions was submitted
    and finalized."""
    spec = json.loads(Path(args.spec).read_text())
    identity = native.Identity.from_seed(bytes.fromhex(spec["seeds"][args.index]))
    validators = [(bytes.fromhex(k), a) for k, a in spec["validators"]]
    genesis = bytes.fromhex(spec["genesis"])
    node = native.ConsensusNode(
        identity,
        Path(args.storage),
        spec["listens"][args.index],
        validators,
        genesis,
        block_interval_ms=PARAMETERS.block_interval_ms,
        leader_timeout_ms=PARAMETERS.leader_timeout_ms,
    )
    chain_id = bytes.fromhex(spec["chain_id"])
    finalized: dict[bytes, float] = {}
    heights: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            block = node.next_finalized(0.05)
            if block is None:
                continue
            now = time.time()
            for raw in block.transactions:
                finalized.setdefault(raw[-32:], now)  # the signature's tail names the transaction
            heights.append((now, block.height, len(block.transactions)))
            node.acknowledge(block.height)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    start_at = spec["start_at"]
    time.sleep(max(0.0, start_at - time.time()))
    submitted: dict[bytes, float] = {}
    recipient = native.Identity.generate().public_key
    interval = 1.0 / args.rate
    next_at = time.time()
    nonce = 0
    while time.time() < start_at + args.seconds:
        nonce += 1
        raw = sign_transaction(
            identity, chain_id, nonce, transfer=chain_pb2.TransferCredits(recipient_key=recipient, credits=1)
        )
        with contextlib.suppress(native.MempoolFullError):
            node.submit(raw)
            submitted[raw[-32:]] = time.time()
        next_at += interval
        time.sleep(max(0.0, next_at - time.time()))
    time.sleep(args.drain)
    stop.set()
    thread.join()
    latencies = [finalized[t] - s for t, s in submitted.items() if t in finalized]
    window = [(t, n) for t, _, n in heights if start_at + 2 <= t <= start_at + args.seconds]
    Path(args.out).write_text(
        json.dumps(
            {
                "submitted": len(submitted),
                "finalized_own": len(latencies),
                "latencies_s": latencies,
                "decided_in_window": sum(n for _, n in window),
                "window_s": max(0.0, args.seconds - 2),
                "height": heights[-1][1] if heights else 0,
            }
        )
    )
    node.stop()


def delay_proxy(listen_port: int, target_port: int, delay_s: float, stop: threading.Event) -> threading.Thread:
    """A TCP relay on loopback that holds every byte for ``delay_s`` in each direction, in order:
    a one-way network delay in front of one validator (this machine's kernel has no netem)."""
    import asyncio

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            loop = asyncio.get_running_loop()
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + delay_s, data))
        queue.put_nowait((loop.time() + delay_s, b""))
        with contextlib.suppress(ConnectionError):
            await sender

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", listen_port)
        while not stop.is_set():
            await asyncio.sleep(0.1)
        server.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


def consensus_run(validators: int, rate: float, seconds: float, delay_ms: int | None, scratch: Path) -> dict[str, Any]:
    """One run: ``validators`` processes offering ``rate`` transfers/s in all; with ``delay_ms``,
    every validator is reached through a proxy adding that delay each way."""
    seeds = [os.urandom(32) for _ in range(validators)]
    identities = [native.Identity.from_seed(s) for s in seeds]
    base = free_port_block(2 * validators)
    listens = [f"127.0.0.1:{base + i}" for i in range(validators)]
    stop = threading.Event()
    if delay_ms:
        addresses = [f"127.0.0.1:{base + validators + i}" for i in range(validators)]
        for i in range(validators):
            delay_proxy(base + validators + i, base + i, delay_ms / 1000, stop)
    else:
        addresses = listens
    try:
        genesis = Genesis(
            name="bench",
            created_unix_ms=1,
            validators=[
                GenesisValidator(key=i.public_key.hex(), address=a) for i, a in zip(identities, addresses, strict=True)
            ],
            accounts=[GenesisAccount(key=i.public_key.hex(), credits=10**9) for i in identities],
        )
        genesis_bytes = genesis.encode()
        spec = scratch / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "seeds": [s.hex() for s in seeds],
                    "validators": [[i.public_key.hex(), a] for i, a in zip(identities, addresses, strict=True)],
                    "listens": listens,
                    "genesis": genesis_bytes.hex(),
                    "chain_id": ChainState(None, genesis, genesis_bytes).chain_id.hex(),
                    "start_at": time.time() + 3.0 + 0.3 * validators,
                }
            )
        )
        processes = []
        for index in range(validators):
            command = [
                sys.executable,
                __file__,
                "--worker",
                "--spec",
                str(spec),
                "--index",
                str(index),
                "--storage",
                str(scratch / f"v{index}"),
                "--rate",
                str(rate / validators),
                "--seconds",
                str(seconds),
                "--drain",
                "3",
                "--out",
                str(scratch / f"out{index}.json"),
            ]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for process in processes:
            _, errors = process.communicate(timeout=seconds + 120)
            if process.returncode != 0:
                raise RuntimeError(f"a validator failed: {errors.decode(errors='replace')[-2000:]}")
        outputs = [json.loads((scratch / f"out{i}.json").read_text()) for i in range(validators)]
    finally:
        stop.set()
    latencies = sorted(x for o in outputs for x in o["latencies_s"])
    observer = outputs[0]
    return {
        "validators": validators,
        "one_way_delay_ms": delay_ms or 0,
        "offered_tx_per_s": rate,
        "submitted": sum(o["submitted"] for o in outputs),
        "finalized": len(latencies),
        "decided_tx_per_s": observer["decided_in_window"] / observer["window_s"] if observer["window_s"] else 0.0,
        "commit_latency_p50_s": statistics.median(latencies) if latencies else None,
        "commit_latency_p99_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "height": observer["height"],
    }


def consensus(args: argparse.Namespace) -> dict[str, Any]:
    settings: list[tuple[int, int | None]] = [(n, None) for n in args.validators] + [(n, 20) for n in args.validators]
    runs: list[dict[str, Any]] = []
    for (validators, delay), rate in ((setting, rate) for setting in settings for rate in args.rates):
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory() as scratch:
                result = consensus_run(validators, rate, args.seconds, delay, Path(scratch))
            result["repeat"] = repeat
            runs.append(result)
            console.print(
                f"{validators} validators, {delay or 0} ms, {rate:.0f} tx/s offered: "
                f"{result['decided_tx_per_s']:.0f} tx/s decided, "
                f"commit p50 {result['commit_latency_p50_s'] or float('nan'):.2f} s, "
                f"p99 {result['commit_latency_p99_s'] or float('nan'):.2f} s"
            )
    summary = []
    for (validators, delay), rate in ((setting, rate) for setting in settings for rate in args.rates):
        mine = [
            r
            for r in runs
            if r["validators"] == validators and r["one_way_delay_ms"] == (delay or 0) and r["offered_tx_per_s"] == rate
        ]
        for key in ("decided_tx_per_s", "commit_latency_p50_s", "commit_latency_p99_s"):
            values = [r[key] for r in mine if r[key] is not None]
            summary.append(
                {
                    "validators": validators,
                    "one_way_delay_ms": delay or 0,
                    "offered_tx_per_s": rate,
                    "metric": key,
                    "median": statistics.median(values) if values else None,
                    "min": min(values) if values else None,
                    "max": max(values) if values else None,
                }
            )
    return {"runs": runs, "summary": summary}


# --- 2. bytes and CPU per served request -------------------------------------------------------


def per_request(replicas: int, requests_per_pair_epoch: float, cheques_per_settlement: int) -> dict[str, Any]:
    provider, router = native.Identity.generate(), native.Identity.generate()
    writer = ReceiptWriter(
        provider, "a" * 32, b"\x01" * 32, list(range(40)), common_pb2.SamplingParams(max_new_tokens=64)
    )
    for token in range(64):
        writer.add(token, b"word")
    receipt = writer.sign(common_pb2.FINISH_REASON_LENGTH, common_pb2.Timing(prompt_tokens=40, completion_tokens=64))
    receipt.cosignatures.add(signer_key=router.public_key, signature=router.sign(receipt.receipt))
    # The replaced ledger's ServedWork entry: the co-signed receipt, the payer, the credits, the
    # author's sequence, previous hash and timestamp, signed (its format, ledger.proto before
    # the chain).
    old_entry_bytes = receipt.ByteSize() + 32 + 8 + 8 + 32 + 8 + 16 + 64 + 32
    chain_id = b"\x02" * 32
    cheque = sign_cheque(router, chain_id, provider.public_key, 1234)
    settlement = sign_transaction(
        provider, chain_id, 1, settle=chain_pb2.SettleCheques(cheques=[cheque] * cheques_per_settlement)
    )
    per_cheque = len(settlement) / cheques_per_settlement  # a payee settles all its payers at once
    rounds = 2000
    started = time.process_time()
    for i in range(rounds):
        signed = sign_cheque(router, chain_id, provider.public_key, i + 1)
    sign_s = (time.process_time() - started) / rounds
    started = time.process_time()
    for _ in range(rounds):
        open_cheque(signed, chain_id)
    verify_s = (time.process_time() - started) / rounds
    body = receipt.receipt
    started = time.process_time()
    for _ in range(rounds):
        native.verify_signature(provider.public_key, body, receipt.signature)
        native.verify_signature(router.public_key, body, receipt.cosignatures[0].signature)
    old_check_s = (time.process_time() - started) / rounds
    return {
        "assumed": {"replicas": replicas, "requests_per_payer_provider_pair_per_epoch": requests_per_pair_epoch},
        "cheque": {
            "bytes_off_chain_per_request": cheque.ByteSize(),
            "chain_bytes_per_request": per_cheque / requests_per_pair_epoch,
            "replicated_bytes_per_request": per_cheque * replicas / requests_per_pair_epoch,
            "cpu_s_per_request": sign_s + verify_s + old_check_s / 2 * replicas / requests_per_pair_epoch,
        },
        "per_request_entry": {
            "chain_bytes_per_request": old_entry_bytes,
            "replicated_bytes_per_request": old_entry_bytes * replicas,
            "cpu_s_per_request": sign_s + old_check_s * replicas,
        },
        "ratio_replicated_bytes": old_entry_bytes * requests_per_pair_epoch / per_cheque,
        "settlement_bytes_per_cheque": per_cheque,
        "cheques_per_settlement": cheques_per_settlement,
        "receipt_bytes": receipt.ByteSize(),
    }


# --- 3. settlement of 10,000 providers ---------------------------------------------------------


def settlement(providers: int, routers: int, requests_per_epoch: int, quick: bool) -> dict[str, Any]:
    rng = random.Random(3)
    provider_keys = [native.Identity.generate() for _ in range(providers)]
    router_keys = [native.Identity.generate() for _ in range(routers)]
    weights = [1 / (rank + 1) ** 0.8 for rank in range(providers)]  # popularity, Zipf-like
    pairs: dict[tuple[int, int], int] = {}
    for _ in range(requests_per_epoch):
        p = rng.choices(range(providers), weights)[0]
        r = rng.randrange(routers)
        pairs[(r, p)] = pairs.get((r, p), 0) + 1
    validator = native.Identity.generate()
    genesis = Genesis(
        name="settlement",
        created_unix_ms=1,
        validators=[GenesisValidator(key=validator.public_key.hex(), address="127.0.0.1:1")],
        accounts=[GenesisAccount(key=r.public_key.hex(), credits=10**9) for r in router_keys],  # providers: fresh
    )
    state = ChainState(None, genesis, genesis.encode())
    state.apply(genesis_block(genesis.encode()))
    by_provider: dict[int, list[chain_pb2.SignedCheque]] = {}
    for (r, p), n in pairs.items():
        cheque = sign_cheque(router_keys[r], state.chain_id, provider_keys[p].public_key, n)
        by_provider.setdefault(p, []).append(cheque)
    transactions = []
    for p, cheques in by_provider.items():  # each provider settles all its payers at once, as nodes do
        for nonce, start in enumerate(range(0, len(cheques), CHEQUES_PER_SETTLEMENT), 1):
            batch = chain_pb2.SettleCheques(cheques=cheques[start : start + CHEQUES_PER_SETTLEMENT])
            transactions.append(sign_transaction(provider_keys[p], state.chain_id, nonce, settle=batch))
    block_size = 256
    apply_s: list[float] = []
    root_s: list[float] = []  # the state root's share of each block (a probe around ChainState._root)
    kept_root = ChainState._root

    def timed_root(self: ChainState, height: int, digest: bytes) -> bytes:
        started = time.perf_counter()
        try:
            return kept_root(self, height, digest)
        finally:
            root_s.append(time.perf_counter() - started)

    ChainState._root = timed_root  # type: ignore[method-assign]
    parent = state.block_digest
    limit = len(transactions) if not quick else min(len(transactions), 4 * block_size)
    for height, start in enumerate(range(0, limit, block_size), 1):
        block = native.decode_chain_block(
            native.encode_chain_block(parent, height, height, transactions[start : start + block_size])
        )
        started = time.perf_counter()
        applied = state.apply(block)
        apply_s.append(time.perf_counter() - started)
        parent = block.digest
        assert applied.void == (), applied.void[:3]
    ChainState._root = kept_root  # type: ignore[method-assign]
    # The same run's baseline: the root recomputed from every row (what each block paid before
    # the root was kept incrementally, there with a cheaper per-row hash), at the final state.
    recount_s = []
    for _ in range(3):
        started = time.perf_counter()
        assert state.recount_state_set()
        recount_s.append(time.perf_counter() - started)
    blocks_needed = -(-len(transactions) // block_size)
    epoch_s = PARAMETERS.epoch_blocks * PARAMETERS.block_interval_ms / 1000
    return {
        "providers": providers,
        "routers": routers,
        "requests_per_epoch": requests_per_epoch,
        "pairs_settled_per_epoch": len(pairs),
        "requests_per_pair": requests_per_epoch / len(pairs),
        "settlement_transactions_per_epoch": len(transactions),
        "cheques_per_transaction": len(pairs) / len(transactions),
        "blocks_needed_per_epoch": blocks_needed,
        "blocks_per_epoch": PARAMETERS.epoch_blocks,
        "epoch_s": epoch_s,
        "apply_s_per_block_median": statistics.median(apply_s),
        "apply_s_per_block_max": max(apply_s),
        "root_s_per_block_median": statistics.median(root_s),
        "root_s_per_block_max": max(root_s),
        "root_from_every_row_s": statistics.median(recount_s),
        "root_from_every_row_over_incremental_median": statistics.median(recount_s) / statistics.median(root_s),
        "blocks_applied": len(apply_s),
        "fits_in_an_epoch": blocks_needed <= PARAMETERS.epoch_blocks
        and statistics.median(apply_s) < PARAMETERS.block_interval_ms / 1000,
    }


# --- the run -----------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = results["consensus"]["runs"]
    for delay, rate in sorted({(r["one_way_delay_ms"], r["offered_tx_per_s"]) for r in runs}):
        for axis, metric, label in (
            (axes[0], "decided_tx_per_s", "decided transactions/s"),
            (axes[1], "commit_latency_p50_s", "commit latency p50 (s)"),
        ):
            rows = [
                s
                for s in results["consensus"]["summary"]
                if s["one_way_delay_ms"] == delay
                and s["offered_tx_per_s"] == rate
                and s["metric"] == metric
                and s["median"] is not None
            ]
            xs = [s["validators"] for s in rows]
            axis.errorbar(
                xs,
                [s["median"] for s in rows],
                yerr=[[s["median"] - s["min"] for s in rows], [s["max"] - s["median"] for s in rows]],
                marker="o",
                capsize=4,
                label=f"{rate:.0f} tx/s offered, " + (f"{delay} ms one way" if delay else "loopback"),
            )
            axis.set_xlabel("validators")
            axis.set_ylabel(label)
            axis.legend()
    figure.suptitle("Ledger chain: Commonware simplex at the genesis defaults (500 ms blocks, 256 tx)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run that writes nothing")
    parser.add_argument("--validators", type=int, nargs="+", default=[4, 7, 10])
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[300.0, 1200.0],
        help="offered transfers/s over all validators: below and above what blocks of 256 every 500 ms hold",
    )
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)  # a worker's share
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--keep-consensus",
        action="store_true",
        help="reuse the consensus runs of the last results/ledger.json (re-measure the rest)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--spec", "--storage", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--drain", type=float, default=3.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.validators, args.seconds, args.repeats, args.rates = [4], 6.0, 1, [300.0]
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "parameters": PARAMETERS.model_dump(),
        "consensus": (
            json.loads((RESULTS / "ledger.json").read_text())["consensus"] if args.keep_consensus else consensus(args)
        ),
        "settlement": settlement(10_000, 200, 100_000, args.quick),
    }
    # Per request, for a busy pair (20 requests per epoch) and for the sparse traffic of the
    # settlement simulation (its requests per settlement).
    simulated: dict[str, Any] = results["settlement"]
    sparse = float(simulated["requests_per_pair"])
    batch = round(simulated["cheques_per_transaction"])
    results["per_request"] = {
        "busy_pairs": per_request(replicas=10, requests_per_pair_epoch=20, cheques_per_settlement=batch),
        "simulated_traffic": per_request(replicas=10, requests_per_pair_epoch=sparse, cheques_per_settlement=batch),
    }
    console.print_json(json.dumps({k: v for k, v in results.items() if k != "consensus"}))
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ledger.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "ledger.png")
    console.print(f"wrote {RESULTS / 'ledger.json'} and ledger.png")


if __name__ == "__main__":
    main()
