"""The operators' ledger commands against a local swarm of real processes (`swarmserve up`'s
layout: relays and router 1 validate, each operator's nodes share an account), and a validator
killed with SIGKILL while blocks are being committed: after its restart it has lost no decided
block, catches up, and `swarmserve ledger verify` replays its chain clean. Also tried: a transfer
of more than the account holds, keys that are not keys and a validator address that is a name
(clear errors, exit status 1); a node offering to validate and withdrawing."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmserve import native
from swarmserve.swarm import OPERATOR_CREDITS, LocalSwarm, free_port_block


def ledger(*args: str) -> tuple[int, Any]:
    """Runs `swarmserve ledger ARGS --json`; returns its exit status and its JSON (or stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "ledger", *args, "--json"], capture_output=True, text=True, timeout=120
    )
    return done.returncode, json.loads(done.stdout) if done.returncode in (0, 2) and done.stdout else done.stderr


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def test_ledger_commands_and_a_validator_killed_while_committing(tmp_path: Path) -> None:
    swarm = LocalSwarm(tmp_path, ports_from=free_port_block(12), relays=3, inference_nodes=1)
    await swarm.start()
    try:
        router_dir, relay_dir, operator_dir = (str(tmp_path / n) for n in ("router-1", "relay-1", "operator-1"))
        deadline = time.monotonic() + 60
        while (status := ledger("status", "--data-dir", router_dir))[1]["height"] < 2:
            assert time.monotonic() < deadline, "no block decided"
            await asyncio.sleep(0.5)
        code, fields = status
        assert code == 0 and fields["role"] == "validator" and len(fields["validators"]) == 4
        assert fields["account"] == swarm.identity_key("operator-1").hex()  # the router spends from it
        assert ledger("status", "--data-dir", str(tmp_path / "inference-1"))[1]["role"] == "follower"

        # Transfers from the operator's account, submitted through the router, while relay-1 (a
        # validator) is killed mid-stream: the chain goes on with 3 of 4.
        fresh = native.Identity.generate().public_key.hex()
        via = ("--via", swarm.router)
        code, sent = ledger("transfer", "--data-dir", operator_dir, "--to", fresh, "--credits", "7", *via)
        assert code == 0 and sent["applied"], sent
        swarm.signal("relay-1", signal.SIGKILL)
        for _ in range(3):
            code, sent = ledger("transfer", "--data-dir", operator_dir, "--to", fresh, "--credits", "1", *via)
            assert code == 0 and sent["applied"], sent
        height_without = sent["height"]
        code, refused = ledger("transfer", "--data-dir", operator_dir, "--to", fresh, "--credits", "999999", *via)
        assert code == 1 and "holds" in refused
        code, bad = ledger("balance", "--data-dir", router_dir, "--account", "not-a-key")
        assert code == 1 and "32-byte identity key" in bad
        # The inference node offers to validate (its account alone qualifies: fewer than
        # min_committee, so the committee stays), then withdraws; a name is not an address.
        inference_dir = str(tmp_path / "inference-1")
        code, offered = ledger("validate", "--data-dir", inference_dir, "--address", "127.0.0.1:7999", *via)
        assert code == 0 and offered["address"] == "127.0.0.1:7999", offered
        assert ledger("status", "--data-dir", router_dir)[1]["candidacy"]  # a genesis validator is a candidate
        await until(lambda: ledger("status", "--data-dir", inference_dir)[1]["candidacy"] == "127.0.0.1:7999")
        code, bad = ledger("validate", "--data-dir", inference_dir, "--address", "example.com:7999", *via)
        assert code == 1 and "IP literal" in bad
        assert ledger("validate", "--data-dir", inference_dir, "--withdraw", *via)[0] == 0
        await until(lambda: ledger("status", "--data-dir", inference_dir)[1]["candidacy"] is None)

        swarm.restart("relay-1")
        deadline = time.monotonic() + 90
        while ledger("status", "--data-dir", relay_dir)[1]["height"] < height_without:
            assert time.monotonic() < deadline, "the restarted validator did not catch up"
            await asyncio.sleep(1)
        code, balance = ledger("balance", "--data-dir", relay_dir, "--account", fresh)
        assert code == 0 and balance["available"] == 10
        code, operator = ledger(
            "balance", "--data-dir", router_dir, "--account", swarm.identity_key("operator-1").hex()
        )
        assert operator["available"] == OPERATOR_CREDITS - 10
    finally:
        await swarm.stop()
    for node in ("relay-1", "relay-2", "router-1", "inference-1"):
        code, report = ledger("verify", "--data-dir", str(tmp_path / node))
        assert code == 0 and report["ok"] and report["problems"] == [], (node, report)
        assert report["replayed"] + report["unproven_tip"] == report["height"] + 1
        assert report["certificates"] >= 1
    # A replica whose stored history was altered does not verify: a state root (relay 2's copy),
    # a bit of a certificate's signature (the router's).
    with sqlite3.connect(tmp_path / "relay-2" / "chain.sqlite3") as db:
        db.execute("UPDATE blocks SET state_root = zeroblob(32) WHERE height = 2")
    code, report = ledger("verify", "--data-dir", str(tmp_path / "relay-2"))
    assert code == 2 and not report["ok"] and "state root" in report["problems"][0], report
    with sqlite3.connect(tmp_path / "router-1" / "chain.sqlite3") as db:
        height, certificate = db.execute(
            "SELECT height, certificate FROM blocks WHERE certificate IS NOT NULL AND height > 0 ORDER BY height"
        ).fetchone()
        forged = bytes(certificate[:-1]) + bytes([certificate[-1] ^ 1])
        db.execute("UPDATE blocks SET certificate = ? WHERE height = ?", (forged, height))
    code, report = ledger("verify", "--data-dir", str(tmp_path / "router-1"))
    assert code == 2 and not report["ok"] and f"block {height}" in report["problems"][0], report


async def test_validators_cut_off_by_stopping_their_processes(tmp_path: Path) -> None:
    """Relays 1-3 and router 1 validate. One cut off (SIGSTOP: its process hangs, its connections
    open but silent): the chain goes on, and once resumed it catches up. Two cut off (more than
    f = 1): the chain stops, without forking; resumed, it goes on, every node on one chain."""
    swarm = LocalSwarm(tmp_path, ports_from=free_port_block(12), relays=3, inference_nodes=1)
    await swarm.start()
    router_dir = str(tmp_path / "router-1")

    def height(node: str) -> int:
        return int(ledger("status", "--data-dir", str(tmp_path / node))[1]["height"])

    def caught_up() -> bool:
        target = height("router-1")  # read first: the chain moves on while the next reading starts
        return height("relay-1") >= target

    async def until(condition: Any, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.5)

    try:
        await until(lambda: height("router-1") >= 2, "no block decided")
        swarm.signal("relay-1", signal.SIGSTOP)
        stopped_at = height("relay-1")
        await until(lambda: height("router-1") >= stopped_at + 8, "the chain stopped with one validator cut off")
        swarm.signal("relay-1", signal.SIGCONT)
        await until(caught_up, "the resumed validator did not catch up")

        swarm.signal("relay-1", signal.SIGSTOP)
        swarm.signal("relay-2", signal.SIGSTOP)
        await asyncio.sleep(3)  # in-flight views end
        halted = height("router-1")
        await asyncio.sleep(5)
        assert height("router-1") <= halted + 1, "the chain went on without a quorum"
        swarm.signal("relay-1", signal.SIGCONT)
        swarm.signal("relay-2", signal.SIGCONT)
        await until(lambda: height("router-1") >= halted + 8, "the chain did not resume")
    finally:
        await swarm.stop()
    roots = {}
    for node in ("relay-1", "relay-2", "relay-3", "router-1", "inference-1"):
        code, report = ledger("verify", "--data-dir", str(tmp_path / node))
        assert code == 0 and report["ok"], (node, report)
        with sqlite3.connect(tmp_path / node / "chain.sqlite3") as db:
            roots[node] = dict(db.execute("SELECT height, state_root FROM blocks WHERE height <= ?", (halted,)))
    assert all(r == roots[router_dir.rsplit("/", 1)[1]] for r in roots.values()), "one chain on every node"
