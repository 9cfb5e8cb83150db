"""The ledger's consensus node (native/src/consensus, Commonware simplex + marshal + authenticated
p2p) from Python: four validators on loopback sockets, each with its own storage and runtime
thread. They finalize one chain, carry a transaction submitted to any of them, keep going with
one of four stopped (f = 1), stop without forking with two stopped and resume when one returns,
and a restarted validator picks up from its storage and is given again every block it had not
acknowledged. Certificates and evidence are checked from bytes: a certificate against another
committee, a tampered one, and garbage are refused with ProofError; a follower applies only
blocks a certificate proves."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from swarmserve import native
from swarmserve.chain import BlockProofError, proven_blocks
from swarmserve.v1 import chain_pb2

GENESIS = b'{"chain": "test"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Committee:
    directory: Path
    identities: list[native.Identity] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    nodes: list[native.ConsensusNode | None] = field(default_factory=list)
    chains: list[list[native.ChainBlock]] = field(default_factory=list)
    genesis: bytes = GENESIS

    @property
    def validators(self) -> list[tuple[bytes, str]]:
        return [(i.public_key, a) for i, a in zip(self.identities, self.addresses, strict=True)]

    @property
    def keys(self) -> list[bytes]:
        return [i.public_key for i in self.identities]

    def start(self, index: int) -> native.ConsensusNode:
        node = native.ConsensusNode(
            self.identities[index],
            self.directory / f"validator{index}",
            self.addresses[index],
            self.validators,
            self.genesis,
            block_interval_ms=100,
            leader_timeout_ms=500,
        )
        self.nodes[index] = node
        return node

    def stop(self, index: int) -> None:
        node = self.nodes[index]
        assert node is not None
        node.stop()
        self.nodes[index] = None

    def drain(self, acknowledge: bool = True) -> None:
        for index, node in enumerate(self.nodes):
            while node is not None and (block := node.next_finalized(0.01)) is not None:
                chain = self.chains[index]
                if block.height < len(chain):  # delivered again after a restart: the same block
                    assert chain[block.height].digest == block.digest
                else:
                    assert block.height == len(chain), "heights in order from genesis, without gaps"
                    chain.append(block)
                if acknowledge:
                    node.acknowledge(block.height)

    def wait(self, until: object, timeout: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not until():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}: heights {self.heights()}"
            self.drain()
            time.sleep(0.02)

    def heights(self) -> list[int]:
        return [len(chain) - 1 for chain in self.chains]

    def assert_one_chain(self) -> None:
        shortest = min(len(chain) for chain in self.chains)
        for chain in self.chains[1:]:
            assert [b.digest for b in chain[:shortest]] == [b.digest for b in self.chains[0][:shortest]]


@dataclass
class Held:
    """A replica holding the chain up to ``height`` (one epoch forever, as these nodes run)."""

    height: int
    block_digest: bytes
    keys: list[bytes]
    epoch: int = 0

    def epoch_of(self, height: int) -> int:
        return self.epoch

    def last_of_epoch(self, epoch: int) -> int:
        return 2**62

    def committee_of(self, epoch: int) -> list[tuple[bytes, str]]:
        return [(key, "127.0.0.1:1") for key in self.keys]


def four(tmp_path: Path, genesis: bytes = GENESIS) -> Committee:
    c = Committee(tmp_path, genesis=genesis)
    for _ in range(4):
        c.identities.append(native.Identity.generate())
        c.addresses.append(f"127.0.0.1:{free_port()}")
        c.nodes.append(None)
        c.chains.append([])
    for index in range(4):
        c.start(index)
    return c


@pytest.fixture
def committee(tmp_path: Path) -> Iterator[Committee]:
    c = four(tmp_path)
    yield c
    for node in c.nodes:
        if node is not None:
            node.stop()


def test_a_genesis_file_larger_than_a_transaction_starts_and_restarts_the_chain(tmp_path: Path) -> None:
    """Block 0 carries the whole genesis file (here 100 KB; a transaction may have 32 KiB): the
    validators finalize on it, and one restarted reads it back from its own storage."""
    big = b'{"accounts": "' + b"a" * 100_000 + b'"}'
    c = four(tmp_path, big)
    try:
        c.wait(lambda: min(c.heights()) >= 3, what="blocks on a large genesis")
        assert all(chain[0].transactions == [big] for chain in c.chains)
        c.stop(0)
        c.start(0)
        after = max(c.heights())
        c.wait(lambda: c.heights()[0] > after, what="the restarted validator going on")
        c.assert_one_chain()
    finally:
        for node in c.nodes:
            if node is not None:
                node.stop()


def test_four_validators_finalize_one_chain_carrying_submitted_transactions(committee: Committee) -> None:
    assert committee.nodes[1] is not None and committee.nodes[3] is not None
    assert committee.nodes[1].submit(b"transfer 1") is True
    assert committee.nodes[1].submit(b"transfer 1") is False  # already queued
    assert committee.nodes[3].submit(b"transfer 2") is True  # reaches the leader by gossip
    carried = lambda: all(  # noqa: E731
        {b"transfer 1", b"transfer 2"} <= {t for b in chain for t in b.transactions} for chain in committee.chains
    )
    committee.wait(lambda: carried() and min(committee.heights()) >= 10, what="both transactions everywhere")
    committee.assert_one_chain()
    genesis = committee.chains[0][0]
    assert genesis.height == 0 and genesis.transactions == [GENESIS]
    for chain in committee.chains:
        for parent, child in itertools.pairwise(chain):
            assert child.parent == parent.digest and child.timestamp_ms > parent.timestamp_ms
    certified = [b for b in committee.chains[2] if b.certificate is not None]
    assert len(certified) >= 5
    for block in certified:
        assert block.certificate is not None
        epoch, view, digest = native.verify_finalization(committee.keys, block.certificate)
        assert digest == block.digest and epoch == 0 and view >= block.height
        assert native.decode_chain_block(block.encoded).digest == block.digest


def test_certificates_and_blocks_are_checked_from_bytes(committee: Committee) -> None:
    committee.wait(lambda: any(b.certificate for b in committee.chains[0][1:]), what="a certificate")
    block = next(b for b in committee.chains[0][1:] if b.certificate is not None)
    assert block.certificate is not None
    # Another committee: two keys replaced, so at most two signers are members, short of the
    # three a quorum of four needs. (With one key replaced the remaining three signers can
    # still be a quorum of the new committee, which is what a certificate proves.)
    stranger = [*committee.keys[:2], native.Identity.generate().public_key, native.Identity.generate().public_key]
    with pytest.raises(native.ProofError, match="do not verify"):
        native.verify_finalization(stranger, block.certificate)
    # Every single-byte change is refused (a signature, the proposal, the signer bitmap).
    for position in range(0, len(block.certificate), 7):
        tampered = bytearray(block.certificate)
        tampered[position] ^= 0x01
        with pytest.raises(native.ProofError):
            native.verify_finalization(committee.keys, bytes(tampered))
    with pytest.raises(native.ProofError, match="malformed"):
        native.verify_finalization(committee.keys, block.certificate + b"\x00")
    with pytest.raises(native.ProofError, match="malformed"):
        native.verify_finalization(committee.keys, b"garbage")
    with pytest.raises(ValueError, match="32 bytes"):
        native.verify_finalization([b"short"], block.certificate)
    # A finalization is not evidence of equivocation.
    with pytest.raises(native.ProofError):
        native.verify_equivocation(committee.keys, block.certificate)
    for malformed in (block.encoded[:-1], block.encoded + b"\x00", b""):
        with pytest.raises(native.ProofError, match="malformed block"):
            native.decode_chain_block(malformed)


def test_one_of_four_down_the_chain_goes_on_two_down_it_stops_and_resumes(committee: Committee) -> None:
    committee.wait(lambda: min(committee.heights()) >= 3, what="a start")
    committee.stop(3)
    start = max(committee.heights())
    committee.wait(lambda: min(committee.heights()[:3]) >= start + 5, what="progress with f = 1 down")
    committee.stop(2)
    committee.drain()
    time.sleep(3.0)  # leader timeouts pass; no quorum of 3 is left
    committee.drain()
    halted = committee.heights()[:2]
    time.sleep(2.0)
    committee.drain()
    assert committee.heights()[:2] == halted, "two of four validators finalized nothing more"
    committee.start(2)  # back to three of four, from its own storage
    committee.wait(lambda: min(committee.heights()[:3]) >= max(halted) + 3, what="progress after the return")
    committee.start(3)
    committee.wait(lambda: committee.heights()[3] >= max(halted) + 3, what="the last one catching up")
    committee.assert_one_chain()


def test_a_restarted_validator_is_given_again_what_it_had_not_acknowledged(committee: Committee) -> None:
    committee.wait(lambda: min(committee.heights()) >= 5, what="a start")
    node = committee.nodes[0]
    assert node is not None
    acknowledged = committee.heights()[0]
    # Take more blocks without acknowledging them, then stop.
    deadline = time.monotonic() + 20
    unacknowledged = []
    while len(unacknowledged) < 3:
        assert time.monotonic() < deadline
        block = node.next_finalized(0.1)
        if block is not None:
            unacknowledged.append(block)
    committee.stop(0)
    restarted = committee.start(0)
    first = None
    while first is None:
        assert time.monotonic() < deadline + 10
        first = restarted.next_finalized(0.1)
    assert first.height <= acknowledged + 1, "delivery resumes after the last acknowledged block"
    redelivered = {first.height: first.digest}
    while max(redelivered) < unacknowledged[-1].height:
        block = restarted.next_finalized(1.0)
        assert block is not None
        redelivered[block.height] = block.digest
        restarted.acknowledge(block.height)
    assert all(redelivered[b.height] == b.digest for b in unacknowledged)
    stopped = committee.nodes[1]
    assert stopped is not None
    committee.stop(1)
    with pytest.raises(native.ConsensusStoppedError):
        stopped.submit(b"too late")
    with pytest.raises(native.ConsensusStoppedError):
        stopped.next_finalized(0.0)


def test_a_follower_applies_only_blocks_a_certificate_proves(committee: Committee) -> None:
    """swarmserve.chain.proof on real blocks and certificates: a served run of blocks is final up
    to its last certified block; a run with a forged block, a certificate for another block or another
    epoch, or a gap is refused; uncertified blocks after the last certificate wait."""
    committee.wait(lambda: sum(b.certificate is not None for b in committee.chains[0][1:]) >= 3, what="certificates")
    chain = committee.chains[0]
    served = [chain_pb2.FinalizedBlock(block=b.encoded, certificate=b.certificate or b"") for b in chain]
    last_certified = max(i for i, b in enumerate(chain) if b.certificate is not None)
    proven = proven_blocks(Held(0, chain[0].digest, committee.keys), served[1:])
    assert [b.height for b, _ in proven] == list(range(1, last_certified + 1))
    # Without certificates nothing is proven, however well the blocks link.
    bare = [chain_pb2.FinalizedBlock(block=b.encoded) for b in chain[1:]]
    assert proven_blocks(Held(0, chain[0].digest, committee.keys), bare) == []
    # A block the committee never finalized, linked into the run, before a real certificate.
    first = chain[1]
    forged = native.encode_chain_block(first.parent, 1, first.timestamp_ms, [b"mint 1000000 to me"])
    with pytest.raises(BlockProofError, match="does not continue"):
        proven_blocks(Held(0, chain[0].digest, committee.keys), [chain_pb2.FinalizedBlock(block=forged), *served[2:]])
    # A real certificate attached to another block.
    certified = next(b for b in chain[1:] if b.certificate is not None)
    stolen = chain_pb2.FinalizedBlock(block=forged, certificate=certified.certificate)
    with pytest.raises(BlockProofError, match="another block"):
        proven_blocks(Held(0, chain[0].digest, committee.keys), [stolen])
    # A certificate signed by another committee.
    with pytest.raises(BlockProofError):
        strangers = [native.Identity.generate().public_key for _ in range(4)]
        proven_blocks(Held(0, chain[0].digest, strangers), served[1:])
    # A certificate of another epoch (these nodes run epoch 0 forever): the committee of the
    # block's epoch must have finalized it.
    with pytest.raises(BlockProofError, match="its certificate of 0"):
        proven_blocks(Held(0, chain[0].digest, committee.keys, epoch=1), served[1:])
    # A gap.
    with pytest.raises(BlockProofError, match="does not continue"):
        proven_blocks(Held(0, chain[0].digest, committee.keys), served[2:])
