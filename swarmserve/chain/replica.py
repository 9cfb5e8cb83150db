"""A node's copy of the ledger's chain, kept current in one of two ways:

- a **validator** (its identity key is in the genesis committee) runs the consensus node
  (:class:`swarmserve.native.ConsensusNode`) and applies each block it finalizes, acknowledging
  it only once the state is durable; evidence of a validator's conflicting votes is turned into
  a transaction, so the ledger slashes it;
- a **follower** asks a random live member for the blocks after its own, every
  ``sync_interval_s``, and applies those proven final (:func:`proven_blocks`): whoever serves
  them, only blocks the committee finalized are applied.

Either way the node's state is :class:`ChainState`, derived from finalized blocks only. Its own
transactions (and those submitted to it) go to the consensus node if it is a validator, else
to a live validator member.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from pathlib import Path

import grpc
from grpc import aio

from swarmserve import native
from swarmserve.chain.genesis import Genesis
from swarmserve.chain.proof import BlockProofError, proven_blocks
from swarmserve.chain.state import ChainState, StateError, genesis_block
from swarmserve.chain.transactions import TransactionError, decode_transaction, sign_transaction
from swarmserve.overlay.directory import PeerDirectory
from swarmserve.rpc import ChannelPool, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from swarmserve.telemetry import get_logger
from swarmserve.v1 import chain_pb2, chain_pb2_grpc

__all__ = ["MAX_BLOCKS_PER_FETCH", "ChainReplica"]

log = get_logger("swarmserve.chain")

MAX_BLOCKS_PER_FETCH = 256
_TIMEOUT_S = 5.0


class ChainReplica:
    def __init__(
        self,
        data_dir: Path,
        genesis: Genesis,
        genesis_bytes: bytes,
        identity: native.Identity,
        directory: PeerDirectory,
        channels: ChannelPool,
        *,
        consensus_listen: str | None = None,
        sync_interval_s: float = 1.0,
    ) -> None:
        self.genesis = genesis
        self.identity = identity
        self.state = ChainState(data_dir / "chain.sqlite3", genesis, genesis_bytes)
        self.committee = [key for key, _ in genesis.committee()]
        self.validator = identity.public_key in self.committee
        self._consensus_dir = data_dir / "consensus"
        self._listen = consensus_listen or dict(genesis.committee()).get(identity.public_key, "")
        self._directory = directory
        self._channels = channels
        self._sync_interval_s = sync_interval_s
        self._rng = random.SystemRandom()
        self._nonce_lock = threading.Lock()
        self._last_nonce = 0
        self.consensus: native.ConsensusNode | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def chain_id(self) -> bytes:
        return self.state.chain_id

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.state.height < 0:
            self.state.apply(genesis_block(self.state.genesis_bytes))
        if self.validator:
            parameters = self.genesis.parameters
            self.consensus = native.ConsensusNode(
                self.identity,
                self._consensus_dir,
                self._listen,
                self.genesis.committee(),
                self.state.genesis_bytes,
                block_interval_ms=parameters.block_interval_ms,
                leader_timeout_ms=parameters.leader_timeout_ms,
            )
            self._thread = threading.Thread(target=self._follow_consensus, name="chain-apply", daemon=True)
            self._thread.start()
        else:
            self._task = asyncio.get_running_loop().create_task(self._follow_peers())
        log.info(
            "chain replica started",
            role="validator" if self.validator else "follower",
            height=self.state.height,
            chain_id=self.chain_id.hex()[:16],
        )

    def _follow_consensus(self) -> None:
        consensus = self.consensus
        assert consensus is not None
        while not self._stop.is_set():
            try:
                block = consensus.next_finalized(0.2)
            except native.ConsensusStoppedError as error:
                if not self._stop.is_set():
                    log.error("the consensus node stopped", reason=str(error))
                return
            if block is not None:
                try:
                    self.state.apply(block)
                except StateError as error:  # a fork or another genesis: never merged
                    log.error("finalized block refused", height=block.height, reason=str(error))
                    return
                consensus.acknowledge(block.height)
            evidence = consensus.next_evidence(0.0)
            if evidence is not None:
                self._report_equivocation(evidence)

    def _report_equivocation(self, evidence: bytes) -> None:
        raw = sign_transaction(
            self.identity,
            self.chain_id,
            self.next_nonce(),
            equivocation=chain_pb2.EquivocationEvidence(evidence=evidence),
        )
        try:
            assert self.consensus is not None
            self.consensus.submit(raw)
            log.warning("a validator signed conflicting votes; evidence submitted")
        except native.ConsensusError as error:
            log.error("could not submit equivocation evidence", reason=str(error))

    async def _follow_peers(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s * self._rng.uniform(0.5, 1.5))
            with contextlib.suppress(TimeoutError, aio.AioRpcError):
                await self.sync_once()

    async def sync_once(self) -> int:
        """Fetches and applies the blocks a random live member holds beyond this replica's;
        returns how many were applied."""
        members = [p for p in self._directory.members() if p.alive and p.descriptor.address]
        if not members:
            return 0
        peer = self._rng.choice(members)
        stub = chain_pb2_grpc.ChainStub(self._channels.get(peer.descriptor.address))
        applied = 0
        while True:
            held_height, held_digest = self.state.height, self.state.block_digest
            answer = await stub.GetBlocks(
                chain_pb2.GetBlocksRequest(from_height=held_height + 1, limit=MAX_BLOCKS_PER_FETCH), timeout=_TIMEOUT_S
            )
            try:
                proven = proven_blocks(self.committee, held_height, held_digest, list(answer.blocks))
            except BlockProofError as error:
                log.warning("a member served blocks that are not proven final", peer=peer.node_id, reason=str(error))
                return applied
            if not proven:
                return applied
            for block, certificate in proven:
                await asyncio.to_thread(self.state.apply, block, certificate)
                applied += 1
            if len(answer.blocks) < MAX_BLOCKS_PER_FETCH:
                return applied

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.consensus is not None:
            await asyncio.to_thread(self.consensus.stop)
        self.state.close()

    # --- transactions -----------------------------------------------------------------------

    def next_nonce(self) -> int:
        """The nonce for this node's next transaction: past both the chain's and any this node
        signed that the chain has not applied yet."""
        with self._nonce_lock:
            self._last_nonce = max(self._last_nonce, self.state.account(self.identity.public_key).nonce) + 1
            return self._last_nonce

    async def submit(self, raw: bytes) -> bool:
        """Queues a transaction for a block: checks it, then hands it to the consensus node or to
        a live validator. Raises InvalidArgument, ResourceExhausted or Unavailable."""
        try:
            transaction = decode_transaction(raw, self.chain_id)
        except TransactionError as error:
            raise InvalidArgument(str(error)) from error
        if transaction.nonce <= self.state.account(transaction.account).nonce:
            raise InvalidArgument(f"nonce {transaction.nonce} is already spent")
        if self.consensus is not None:
            try:
                return self.consensus.submit(raw)
            except native.MempoolFullError as error:
                raise ResourceExhausted(str(error)) from error
            except native.ConsensusStoppedError as error:
                raise Unavailable(str(error)) from error
        validators = [p for p in self._directory.members() if p.alive and p.descriptor.identity_key in self.committee]
        self._rng.shuffle(validators)
        request = chain_pb2.SubmitTransactionRequest(transaction=chain_pb2.SignedTransaction.FromString(raw))
        for peer in validators:
            stub = chain_pb2_grpc.ChainStub(self._channels.get(peer.descriptor.address))
            try:
                return (await stub.Submit(request, timeout=_TIMEOUT_S)).queued
            except TimeoutError:
                continue
            except aio.AioRpcError as error:
                if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue  # try another validator
                raise ServiceError(error.details() or "refused by the validator", error.code()) from error
        raise Unavailable("no validator of the chain is reachable")
