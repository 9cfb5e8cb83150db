"""Blocks built here, as the validators would, applied to several replicas of the chain's state:
for testing the state machine without consensus."""

from __future__ import annotations

from swarmserve import native
from swarmserve.chain import ChainState, Genesis


class Chain:
    """Builds blocks and applies each to every replica (in memory unless given)."""

    def __init__(self, genesis: Genesis, replicas: list[ChainState] | int = 3) -> None:
        self.genesis_bytes = genesis.encode()
        if isinstance(replicas, int):
            replicas = [ChainState(None, genesis, self.genesis_bytes) for _ in range(replicas)]
        self.replicas = replicas
        self.state = replicas[0]
        self.chain_id = self.state.chain_id
        self.parent = b"\x00" * 32
        self.height = -1
        self.block([self.genesis_bytes])

    def block(self, transactions: list[bytes]) -> native.ChainBlock:
        self.height += 1
        encoded = native.encode_chain_block(self.parent, self.height, 1000 + self.height, transactions)
        block = native.decode_chain_block(encoded)
        for replica in self.replicas:
            replica.apply(block)
        assert self.state.recount_state_set(), "the kept state hash is that of the rows, counted afresh"
        self.parent = block.digest
        return block

    def until(self, height: int) -> None:
        """Empty blocks up to ``height``."""
        while self.height < height:
            self.block([])

    def roots(self) -> set[bytes]:
        return {r.state_root for r in self.replicas}
