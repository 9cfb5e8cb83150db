"""A node's copy of the ledger's chain, kept current in one of two ways, by epoch:

- while the node is in the committee of the epoch of the chain's next block, it is a
  **validator**: it runs the consensus node (:class:`swarmserve.native.ConsensusNode`) and
  applies each block it finalizes, acknowledging it only once the state is durable; after the
  last block of an epoch it hands the consensus node the next epoch's committee (chosen by the
  state machine), and stops it if it is not in it; evidence of a validator's conflicting votes is
  turned into a transaction, so the ledger slashes it;
- otherwise it is a **follower**: it asks a random live member for the blocks after its own,
  every ``sync_interval_s``, and applies those proven final (:func:`proven_blocks`): whoever
  serves them, only blocks the epoch's committee finalized are applied. A follower that finds
  itself in the next epoch's committee starts its consensus node. A validator whose consensus
  node delivers nothing for a while (it was down, or cut off) catches up the same way.

Either way the node's state is :class:`ChainState`, derived from finalized blocks only. Its own
transactions (and those submitted to it) go to the consensus node if it is a validator, else
to a live validator member; its own are held (:class:`Outbox`) and sent again until the chain
consumes their nonces.

The replica also holds the node's payments (:mod:`swarmserve.chain.payments`): the cheques it
signs as a payer, and those it receives as a payee, which it settles on the chain once per
epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from google.protobuf.message import Message
from grpc import aio

from swarmserve import native
from swarmserve.chain.genesis import Genesis
from swarmserve.chain.outbox import Outbox
from swarmserve.chain.payments import ChequeBook, ChequeInbox
from swarmserve.chain.proof import BlockProofError, proven_blocks
from swarmserve.chain.state import AppliedBlock, ChainState, StateError, genesis_block
from swarmserve.chain.transactions import TransactionError, decode_transaction
from swarmserve.overlay.directory import PeerDirectory
from swarmserve.rpc import ChannelPool, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from swarmserve.telemetry import get_logger
from swarmserve.v1 import chain_pb2, chain_pb2_grpc

__all__ = ["MAX_BLOCKS_PER_FETCH", "ChainReplica"]

log = get_logger("swarmserve.chain")

MAX_BLOCKS_PER_FETCH = 256
_TIMEOUT_S = 5.0
_STALLED_BLOCKS = 20  # a validator that applied nothing for this many block intervals catches up from peers
CHEQUES_PER_SETTLEMENT = 128  # about 23 KiB: under the 32 KiB a transaction may take


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
        resend_after_s: float | None = None,
    ) -> None:
        self.genesis = genesis
        self.identity = identity
        self.state = ChainState(data_dir / "chain.sqlite3", genesis, genesis_bytes)
        self.book = ChequeBook(data_dir / "payments.sqlite3", identity, self.state.chain_id)
        self.inbox = ChequeInbox(data_dir / "payments.sqlite3", identity.public_key, self.state.chain_id)
        self._consensus_dir = data_dir / "consensus"
        self._listen = consensus_listen
        self._directory = directory
        self._channels = channels
        self._sync_interval_s = sync_interval_s
        self._rng = random.SystemRandom()
        # Sent again after a few blocks: by then a transaction that reached a proposer is in one.
        self._resend_after_s = resend_after_s or max(0.5, 4 * genesis.parameters.block_interval_ms / 1000)
        self._outbox = Outbox(identity, self.state.chain_id, resend_after_s=self._resend_after_s)
        self._settling: dict[bytes, int] = {}  # payer -> epoch its cheque was last submitted in
        self.consensus: native.ConsensusNode | None = None
        self._consensus_lock = threading.Lock()
        self._consensus_epoch = -1  # the latest epoch the consensus node was told about
        self._applying: threading.Thread | None = None
        self._stop_applying = threading.Event()
        self._last_applied = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        self._resender: asyncio.Task[None] | None = None
        # Transactions refused at submission here, and in applied blocks those void (malformed,
        # a wrong nonce) or failed (applied without effect: an overspend, bad evidence...).
        self.rejected: Counter[str] = Counter({"refused": 0, "void": 0, "failed": 0})

    @property
    def chain_id(self) -> bytes:
        return self.state.chain_id

    def _count(self, applied: AppliedBlock) -> None:
        self.rejected["void"] += len(applied.void)
        self.rejected["failed"] += applied.failed

    @property
    def validator(self) -> bool:
        """True while this node runs the consensus node (it is in the current committee)."""
        return self.consensus is not None

    def committee(self) -> list[tuple[bytes, str]]:
        """The committee of the epoch of the chain's next block, as this replica knows it."""
        return self.state.committee_of(self.state.epoch_of(self.state.height + 1))

    def same_account(self, key: bytes) -> bool:
        """True if ``key`` spends from this node's account (serving it is free)."""
        return self.state.account_of(key) == self.state.account_of(self.identity.public_key)

    # --- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.state.height < 0:
            self.state.apply(genesis_block(self.state.genesis_bytes))
        await self._take_role()
        self._task = asyncio.get_running_loop().create_task(self._keep_current())
        self._settler = asyncio.get_running_loop().create_task(self._settle_every_epoch())
        self._resender = asyncio.get_running_loop().create_task(self._resend_held())
        log.info(
            "chain replica started",
            role="validator" if self.validator else "follower",
            height=self.state.height,
            chain_id=self.chain_id.hex()[:16],
        )

    async def _keep_current(self) -> None:
        stalled_after_s = _STALLED_BLOCKS * self.genesis.parameters.block_interval_ms / 1000
        while True:
            await asyncio.sleep(self._sync_interval_s * self._rng.uniform(0.5, 1.5))
            try:
                if self.consensus is None or time.monotonic() - self._last_applied > stalled_after_s:
                    with contextlib.suppress(TimeoutError, aio.AioRpcError):
                        await self.sync_once()
                await self._take_role()
            except (StateError, ValueError, native.ConsensusError) as error:  # tried again next time
                log.error("could not keep the chain current", reason=str(error))

    async def _take_role(self) -> None:
        """Starts or stops the consensus node as this node enters or leaves the committee."""
        epoch = self.state.epoch_of(self.state.height + 1)
        member = any(key == self.identity.public_key for key, _ in self.state.committee_of(epoch))
        if self.consensus is not None and (not member or not self.consensus.is_running()):
            await self._stop_consensus()
            if member:
                log.warning("the consensus node stopped; starting it again", epoch=epoch)
            else:
                log.info("left the committee; following the chain", epoch=epoch)
        elif member and self.consensus is None:
            await self._start_consensus(epoch)
            log.info("joined the committee; validating", epoch=epoch)
        elif self.consensus is not None:
            await asyncio.to_thread(self._tell_consensus)  # it may have been behind the state

    async def _start_consensus(self, epoch: int) -> None:
        committee = self.state.committee_of(epoch)
        parameters = self.genesis.parameters
        earlier = [(e, members) for e, members in self.state.committees().items() if e < epoch]
        self.consensus = await asyncio.to_thread(
            native.ConsensusNode,
            self.identity,
            self._consensus_dir,
            self._listen or dict(committee)[self.identity.public_key],
            committee,
            self.state.genesis_bytes,
            epoch=epoch,
            epoch_length=parameters.epoch_blocks,
            floor=self.state.digest_at(self.state.last_of_epoch(epoch - 1)) if epoch > 0 else None,
            earlier_committees=earlier,
            max_committee=parameters.committee_size,
            block_interval_ms=parameters.block_interval_ms,
            leader_timeout_ms=parameters.leader_timeout_ms,
        )
        self._consensus_epoch = epoch
        self._last_applied = time.monotonic()
        self._stop_applying.clear()
        self._applying = threading.Thread(
            target=self._follow_consensus, args=(self.consensus,), name="chain-apply", daemon=True
        )
        self._applying.start()

    async def _stop_consensus(self) -> None:
        self._stop_applying.set()
        if self._applying is not None:
            await asyncio.to_thread(self._applying.join)
        consensus, self.consensus = self.consensus, None
        if consensus is not None:
            await asyncio.to_thread(consensus.stop)

    def _tell_consensus(self) -> None:
        """Hands the consensus node every committee the state chose since it was last told, and
        moves it to the epoch of the chain's next block."""
        with self._consensus_lock:
            consensus = self.consensus
            epoch = self.state.epoch_of(self.state.height + 1)
            if consensus is None or epoch <= self._consensus_epoch:
                return
            try:
                for later in range(self._consensus_epoch + 1, epoch + 1):
                    consensus.add_committee(later, self.state.committee_of(later))
                consensus.enter_epoch(epoch, self.state.digest_at(self.state.last_of_epoch(epoch - 1)))
            except native.ConsensusStoppedError:
                return
            self._consensus_epoch = epoch
            log.info("entered epoch", epoch=epoch, validators=len(self.state.committee_of(epoch)))

    def _follow_consensus(self, consensus: native.ConsensusNode) -> None:
        while not self._stop_applying.is_set():
            try:
                block = consensus.next_finalized(0.2)
            except native.ConsensusStoppedError as error:
                if not self._stop_applying.is_set():
                    log.error("the consensus node stopped", reason=str(error))
                return
            if block is not None:
                try:
                    self._count(self.state.apply(block))
                except StateError as error:  # a fork or another genesis: never merged
                    log.error("finalized block refused", height=block.height, reason=str(error))
                    return
                self._last_applied = time.monotonic()
                consensus.acknowledge(block.height)
                if block.height == self.state.last_of_epoch(self.state.epoch_of(block.height)):
                    self._tell_consensus()
            evidence = consensus.next_evidence(0.0)
            if evidence is not None:
                self._report_equivocation(consensus, evidence)

    def _report_equivocation(self, consensus: native.ConsensusNode, evidence: bytes) -> None:
        try:
            raw = self.sign(equivocation=chain_pb2.EquivocationEvidence(evidence=evidence))
            consensus.submit(raw)
            log.warning("a validator signed conflicting votes; evidence submitted")
        except (native.ConsensusError, ResourceExhausted) as error:
            log.error("could not submit equivocation evidence", reason=str(error))

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
            # Up to the end of the epoch: the next one's committee is known only after it.
            held = self.state.height
            wanted = min(MAX_BLOCKS_PER_FETCH, self.state.last_of_epoch(self.state.epoch_of(held + 1)) - held)
            answer = await stub.GetBlocks(
                chain_pb2.GetBlocksRequest(from_height=held + 1, limit=wanted), timeout=_TIMEOUT_S
            )
            try:
                proven = proven_blocks(self.state, list(answer.blocks))
            except BlockProofError as error:
                log.warning("a member served blocks that are not proven final", peer=peer.node_id, reason=str(error))
                return applied
            if not proven:
                return applied
            for block, certificate in proven:
                self._count(await asyncio.to_thread(self.state.apply, block, certificate))
                applied += 1
            if len(answer.blocks) < wanted or len(proven) < wanted:
                return applied

    async def _settle_every_epoch(self) -> None:
        interval = self.genesis.parameters.block_interval_ms / 1000 * max(1, self.genesis.parameters.epoch_blocks // 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.settle_due()
            except ServiceError as error:
                log.warning("cheques not settled this time", reason=str(error))

    async def settle_due(self) -> int:
        """Submits the received cheques that would pay something now (once per payer and epoch),
        as few transactions as their size allows; returns how many cheques."""
        epoch = self.state.epoch_of(self.state.height + 1)
        due = [c for c in self.inbox.due(self.state) if self._settling.get(c.payer) != epoch]
        for start in range(0, len(due), CHEQUES_PER_SETTLEMENT):
            batch = due[start : start + CHEQUES_PER_SETTLEMENT]
            for cheque in batch:
                self._settling[cheque.payer] = epoch
            await self.send(settle=chain_pb2.SettleCheques(cheques=[c.signed for c in batch]))
        if due:
            log.info("cheques submitted for settlement", cheques=len(due), credits=sum(c.cumulative for c in due))
        return len(due)

    async def close(self) -> None:
        for task in (self._task, self._settler, self._resender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._stop_consensus()
        self.state.close()
        self.book.close()
        self.inbox.close()

    # --- transactions -----------------------------------------------------------------------

    def sign(self, **action: Message) -> bytes:
        """``action`` (one field of ``TransactionBody.kind``) signed as this node's next
        transaction, and held until the chain consumes its nonce (sent again meanwhile). Raises
        ResourceExhausted when too many wait for the chain."""
        return self._outbox.sign(self.state.account(self.identity.public_key).nonce, time.monotonic(), **action)

    async def send(self, **action: Message) -> None:
        """Signs ``action`` as this node's next transaction (:meth:`sign`) and submits it. An
        unreachable chain is no error: the transaction is held and sent again."""
        raw = self.sign(**action)
        try:
            await self.submit(raw)
        except Unavailable as error:
            log.info("transaction held until a validator is reachable", reason=str(error))

    async def _resend_held(self) -> None:
        while True:
            await asyncio.sleep(self._resend_after_s / 2)
            applied = self.state.account(self.identity.public_key).nonce
            for raw in self._outbox.due(applied, time.monotonic()):
                try:
                    await self.submit(raw)
                except ServiceError as error:  # held: tried again later, or consumed meanwhile
                    log.debug("held transaction not sent", reason=str(error))

    async def submit(self, raw: bytes) -> bool:
        """Queues a transaction for a block: checks it, then hands it to the consensus node or to
        a live validator. Raises InvalidArgument, ResourceExhausted or Unavailable."""
        try:
            transaction = decode_transaction(raw, self.chain_id)
        except TransactionError as error:
            self.rejected["refused"] += 1
            raise InvalidArgument(str(error)) from error
        if transaction.nonce <= self.state.account(transaction.account).nonce:
            self.rejected["refused"] += 1
            raise InvalidArgument(f"nonce {transaction.nonce} is already spent")
        if self.consensus is not None:
            try:
                return self.consensus.submit(raw)
            except native.MempoolFullError as error:
                raise ResourceExhausted(str(error)) from error
            except native.ConsensusStoppedError as error:
                raise Unavailable(str(error)) from error
        committee = {key for key, _ in self.committee()}
        validators = [p for p in self._directory.members() if p.alive and p.descriptor.identity_key in committee]
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
