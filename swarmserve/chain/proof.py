"""How a replica decides that blocks served by a peer it does not trust are final: they must
continue its own chain (consecutive heights, each naming its predecessor's digest), and a block
among them must carry a finalization certificate, of the committee of the block's epoch, over
its digest. That block is final, and so is every block it descends from; blocks after the last
certified one wait for a later certificate. Only blocks of the epoch of the replica's next block
are proven at once: the next epoch's committee is known only once this epoch's last block is
applied. A peer can withhold blocks; it cannot make a replica accept one the committee did not
finalize."""

from __future__ import annotations

from typing import Protocol

from swarmserve import native
from swarmserve.v1 import chain_pb2

__all__ = ["BlockProofError", "ChainView", "proven_blocks"]


class ChainView(Protocol):
    """What proving needs of a replica (:class:`swarmserve.chain.state.ChainState` has it)."""

    @property
    def height(self) -> int: ...

    @property
    def block_digest(self) -> bytes: ...

    def epoch_of(self, height: int) -> int: ...

    def last_of_epoch(self, epoch: int) -> int: ...

    def committee_of(self, epoch: int) -> list[tuple[bytes, str]]: ...


class BlockProofError(ValueError):
    """Blocks that do not continue this chain, or a certificate that does not prove them."""


def proven_blocks(
    state: ChainView, served: list[chain_pb2.FinalizedBlock]
) -> list[tuple[native.ChainBlock, bytes | None]]:
    """The served blocks proven final after ``state``'s last block, in order (possibly none),
    each with its certificate; served blocks past the current epoch are left for later."""
    parent, height = state.block_digest, state.height
    epoch = state.epoch_of(height + 1)
    committee = [key for key, _ in state.committee_of(epoch)]
    blocks: list[tuple[native.ChainBlock, bytes | None]] = []
    last_proven = 0
    for entry in served[: state.last_of_epoch(epoch) - height]:
        try:
            block = native.decode_chain_block(entry.block)
        except native.ProofError as error:
            raise BlockProofError(str(error)) from error
        if block.height != height + 1 or (block.height > 0 and block.parent != parent):
            raise BlockProofError(f"block {block.height} does not continue the chain at height {height}")
        blocks.append((block, entry.certificate or None))
        if entry.certificate:
            try:
                certified_epoch, _, digest = native.verify_finalization(committee, entry.certificate)
            except native.ProofError as error:
                raise BlockProofError(f"block {block.height}: {error}") from error
            if digest != block.digest:
                raise BlockProofError(f"block {block.height}: the certificate finalizes another block")
            if certified_epoch != epoch:
                raise BlockProofError(f"block {block.height} is in epoch {epoch}, its certificate of {certified_epoch}")
            last_proven = len(blocks)
        parent, height = block.digest, block.height
    return blocks[:last_proven]
