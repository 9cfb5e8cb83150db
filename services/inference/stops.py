"""Stop strings over a token stream: tokens whose text might be the start of a stop string are
held back until it is clear; when a stop string appears, the stream is cut just before it (the
token it starts in keeps only the text before it) and nothing after is sent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from services.inference.engine import GeneratedToken

__all__ = ["StopMatcher"]


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s.encode() for s in stops if s]
        self._pending: list[GeneratedToken] = []
        self.stopped = False

    def push(self, token: GeneratedToken) -> list[GeneratedToken]:
        """Adds a token; returns the tokens that can be sent now. After a stop string is
        found, ``stopped`` is True and the returned tokens end just before it."""
        if not self._stops:
            return [token]
        self._pending.append(token)
        text = b"".join(t.text for t in self._pending)
        hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take_until(min(hits))
        return self._take_until(len(text) - self._held_suffix(text))

    def flush(self) -> list[GeneratedToken]:
        """The held tokens, at the end of generation (no stop string completed)."""
        pending, self._pending = self._pending, []
        return pending

    def _held_suffix(self, text: bytes) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take_until(self, cut: int) -> list[GeneratedToken]:
        """Releases the pending tokens covering text[:cut]; when cutting mid-token, releases
        that token with its text trimmed (if the stream stopped) or keeps it held."""
        released, offset = [], 0
        for index, token in enumerate(self._pending):
            end = offset + len(token.text)
            if end <= cut:
                released.append(token)
                offset = end
                continue
            if self.stopped:
                if cut > offset:
                    released.append(replace(token, text=token.text[: cut - offset]))
                self._pending = []
            else:
                self._pending = self._pending[index:]
            return released
        self._pending = []
        return released
