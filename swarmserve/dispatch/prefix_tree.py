"""PlanetServe's hash-radix tree (HR-tree): prompts are cut into chunks of CHUNK_TOKENS tokens;
each node of the tree is the hash of a prefix (all chunks up to it), and remembers which serving
nodes recently saw that prefix, i.e. probably hold it in their prefix (KV) cache.

Stored flat: prefix hash -> {node id: last use}. Bounded: the least recently used prefixes are
forgotten once there are more than ``capacity``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from blake3 import blake3

__all__ = ["CHUNK_TOKENS", "PrefixTree", "chunk_hashes"]

CHUNK_TOKENS = 10


def chunk_hashes(token_ids: Sequence[int], chunk: int = CHUNK_TOKENS) -> list[bytes]:
    """The hash of every whole-chunk prefix of ``token_ids``, shortest first."""
    hashes = []
    hasher = blake3()
    for start in range(0, len(token_ids) - len(token_ids) % chunk, chunk):
        hasher.update(b"".join(t.to_bytes(4, "little") for t in token_ids[start : start + chunk]))
        hashes.append(hasher.digest(length=16))
    return hashes


class PrefixTree:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._prefixes: OrderedDict[bytes, dict[str, float]] = OrderedDict()

    def insert(self, node_id: str, token_ids: Sequence[int], now: float) -> None:
        """Records that ``node_id`` served (and so caches) this prompt's prefixes."""
        for key in chunk_hashes(token_ids):
            holders = self._prefixes.get(key)
            if holders is None:
                holders = self._prefixes[key] = {}
            else:
                self._prefixes.move_to_end(key)
            holders[node_id] = now
        while len(self._prefixes) > self.capacity:
            self._prefixes.popitem(last=False)

    def match(self, token_ids: Sequence[int]) -> dict[str, int]:
        """For each node holding a prefix of this prompt: how many chunks it matches."""
        matched: dict[str, int] = {}
        for depth, key in enumerate(chunk_hashes(token_ids), start=1):
            holders = self._prefixes.get(key)
            if not holders:
                break
            for node_id in holders:
                matched[node_id] = depth
        return matched

    def forget(self, node_id: str) -> None:
        """A node left: its cache is gone."""
        for holders in self._prefixes.values():
            holders.pop(node_id, None)

    def __len__(self) -> int:
        return len(self._prefixes)
