"""The onion keys a node peels circuit set-ups with, and the replay tags it remembers for each.

Invariants:

- Onion keys live only in memory. A restarted node makes a new one, so a set-up recorded before
  the restart no longer decrypts: nothing can be replayed across a restart, and nothing about
  replays has to be written to disk.
- The current key is replaced every ``lifetime_s``; the one before is still accepted for
  ``overlap_s`` more (descriptors naming it are still in flight), then forgotten. At most two
  keys are accepted at once, and a descriptor says when its key stops being accepted.
- Each key has its own replay cache, dropped with the key: a tag needs remembering only while
  its key can still peel the set-up it came from.
- A tag is remembered only when the node accepts the set-up (:meth:`OnionKeyRing.accept`), so
  set-ups it refuses (junk, a hop it will not dial, a limit reached) cost it no memory.
- A key whose replay cache fills up is retired at once (a new current key is made): replays
  stay impossible, and set-ups built from the new descriptor go through while the old key
  refuses new ones. Filling a cache takes ``replay_capacity`` accepted set-ups, which the
  per-source limits of the relay spread over many sources and much time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from swarmserve import native

__all__ = ["OnionKeyRing", "OpenedSetup"]


@dataclass
class _KeyEpoch:
    key: native.OnionKey
    replay: native.ReplayCache
    replaced_at: float  # when a newer key takes over (wall clock, seconds)
    retired_at: float  # when this key stops being accepted


@dataclass(frozen=True)
class OpenedSetup:
    """A set-up peeled by one of the ring's keys, not yet accepted."""

    peeled: native.PeeledSetup
    epoch: _KeyEpoch


class OnionKeyRing:
    def __init__(
        self,
        lifetime_s: float = 3600.0,
        overlap_s: float = 600.0,
        replay_capacity: int = 250_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lifetime_s <= 0 or overlap_s < 0:
            raise ValueError("an onion key needs a positive lifetime and a non-negative overlap")
        self._lifetime_s = lifetime_s
        self._overlap_s = overlap_s
        self._capacity = replay_capacity
        self._clock = clock
        self._current = self._new_epoch(clock())
        self._previous: _KeyEpoch | None = None

    def _new_epoch(self, now: float) -> _KeyEpoch:
        # Tags outlive nothing: the cache goes with its key, so its ttl is the key's whole life.
        replay = native.ReplayCache(self._capacity, self._lifetime_s + self._overlap_s + 1.0)
        return _KeyEpoch(
            native.OnionKey.generate(), replay, now + self._lifetime_s, now + self._lifetime_s + self._overlap_s
        )

    def _rotate(self, now: float) -> None:
        self._current.replaced_at = now
        self._current.retired_at = min(self._current.retired_at, now + self._overlap_s)
        self._previous = self._current
        self._current = self._new_epoch(now)

    def _keep_current(self) -> float:
        now = self._clock()
        if now >= self._current.replaced_at:
            self._rotate(now)
        if self._previous is not None and now >= self._previous.retired_at:
            self._previous = None
        return now

    @property
    def public_key(self) -> bytes:
        """The key to publish now."""
        self._keep_current()
        return self._current.key.public_key

    @property
    def expires_unix_ms(self) -> int:
        """When the key to publish stops being accepted (what descriptors carry)."""
        self._keep_current()
        return int(self._current.retired_at * 1000)

    def accepted_keys(self) -> list[bytes]:
        """Public halves of every key a set-up may use now (newest first)."""
        self._keep_current()
        return [e.key.public_key for e in (self._current, self._previous) if e is not None]

    @property
    def remembered(self) -> int:
        """Replay tags held now, over every key accepted."""
        self._keep_current()
        return sum(len(e.replay) for e in (self._current, self._previous) if e is not None)

    def open(self, cell: bytes) -> OpenedSetup:
        """Peels ``cell`` with the current key, else the previous one while it is accepted.
        Raises what the current key's attempt raised (a cell that is no set-up for any key
        accepted now: junk, tampered, or made for a key already forgotten)."""
        self._keep_current()
        try:
            return OpenedSetup(self._current.key.peel_setup(cell), self._current)
        except native.CellAuthenticationError as under_current:
            if self._previous is None:
                raise
            try:
                return OpenedSetup(self._previous.key.peel_setup(cell), self._previous)
            except native.CellAuthenticationError:
                raise under_current from None

    def accept(self, opened: OpenedSetup) -> None:
        """Remembers the set-up's tag under the key that peeled it. Raises ReplayError if it
        was accepted before, ReplayCacheFullError (and retires that key) if the cache is full."""
        now = self._keep_current()
        try:
            opened.epoch.replay.check_and_remember(opened.peeled.replay_tag)
        except native.ReplayCacheFullError:
            if opened.epoch is self._current:
                self._rotate(now)
            raise
