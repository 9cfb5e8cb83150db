"""``swarmserve ledger verify``: replays a node's replica of the chain from its genesis on a fresh
state, checking that every block continues the one before, that finalization certificates of
the committee of their epoch prove them (:func:`swarmserve.chain.proof.proven_blocks`), that
replaying gives the state root the replica stored at every height, and that the replayed
state's incrementally kept hash is that of its rows counted afresh."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmserve.chain.proof import BlockProofError, proven_blocks
from swarmserve.chain.state import ChainState, StateError, genesis_block
from swarmserve.v1 import chain_pb2

__all__ = ["AuditReport", "audit_replica"]

_BATCH = 256


@dataclass
class AuditReport:
    height: int = -1  # the replica's height
    replayed: int = 0  # blocks proven and replayed (genesis included)
    certificates: int = 0  # finalization certificates checked
    unproven_tip: int = 0  # blocks after the last certificate (proven once a later one arrives)
    problems: list[str] = field(default_factory=list)


def audit_replica(replica: ChainState) -> AuditReport:
    report = AuditReport(height=replica.height)
    fresh = ChainState(None, replica.genesis, replica.genesis_bytes)
    try:
        stored = replica.blocks(0, 1)
        genesis = genesis_block(replica.genesis_bytes)
        if not stored or stored[0].block != genesis.encoded:
            report.problems.append("block 0 is not this chain's genesis block")
            return report
        fresh.apply(genesis)
        report.replayed = 1
        pending: list[chain_pb2.FinalizedBlock] = []
        next_height = 1
        while True:
            batch = replica.blocks(next_height, _BATCH) if next_height <= replica.height else []
            if next_height <= replica.height and not batch:
                report.problems.append(f"block {next_height} is missing")
                return report
            next_height += len(batch)
            candidates = pending + batch
            try:
                proven = proven_blocks(fresh, candidates)  # up to the end of an epoch at most
            except BlockProofError as error:
                report.problems.append(str(error))
                return report
            for block, certificate in proven:
                report.certificates += certificate is not None
                fresh.apply(block, certificate)
                if fresh.state_root != replica.root_at(block.height):
                    report.problems.append(f"replaying block {block.height} gives another state root than stored")
                    return report
                report.replayed += 1
            pending = candidates[len(proven) :]
            if not batch and not proven:
                break
        report.unproven_tip = len(pending)
        if not fresh.recount_state_set():
            report.problems.append("the replayed state's rows do not match its kept hash")
    except StateError as error:
        report.problems.append(str(error))
    finally:
        fresh.close()
    return report
