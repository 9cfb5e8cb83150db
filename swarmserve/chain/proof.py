"""How a follower decides that blocks served by a peer it does not trust are final: they must
continue its own chain (consecutive heights, each naming its predecessor's digest), and a
block among them must carry a finalization certificate of the committee over its digest. That
block is final, and so is every block it descends from; blocks after the last certified one
wait for a later certificate. A peer can withhold blocks; it cannot make a follower accept one
the committee did not finalize."""

from __future__ import annotations

from swarmserve import native
from swarmserve.v1 import chain_pb2

__all__ = ["BlockProofError", "proven_blocks"]


class BlockProofError(ValueError):
    """Blocks that do not continue this chain, or a certificate that does not prove them."""


def proven_blocks(
    committee: list[bytes],
    held_height: int,
    held_digest: bytes,
    served: list[chain_pb2.FinalizedBlock],
) -> list[tuple[native.ChainBlock, bytes | None]]:
    """The served blocks proven final, in order (possibly none), each with its certificate."""
    blocks: list[tuple[native.ChainBlock, bytes | None]] = []
    last_proven = 0
    parent, height = held_digest, held_height
    for entry in served:
        try:
            block = native.decode_chain_block(entry.block)
        except native.ProofError as error:
            raise BlockProofError(str(error)) from error
        if block.height != height + 1 or (block.height > 0 and block.parent != parent):
            raise BlockProofError(f"block {block.height} does not continue the chain at height {height}")
        blocks.append((block, entry.certificate or None))
        if entry.certificate:
            try:
                _, _, digest = native.verify_finalization(committee, entry.certificate)
            except native.ProofError as error:
                raise BlockProofError(f"block {block.height}: {error}") from error
            if digest != block.digest:
                raise BlockProofError(f"block {block.height}: the certificate finalizes another block")
            last_proven = len(blocks)
        parent, height = block.digest, block.height
    return blocks[:last_proven]
