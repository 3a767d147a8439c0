"""Stop strings: end a completion at the earliest stop string, which is never returned.

A stop string can straddle detokenized pieces ("<|" then "end|>"), so the checker
holds back any tail of the text that could still grow into a stop string and
releases it once it cannot (or at the end of the completion).
"""
from __future__ import annotations

from typing import Sequence


class StopChecker:
    """Filters one completion's text stream; `stopped` turns true at the first stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stop = tuple(dict.fromkeys(stop))
        self._longest = max((len(s) for s in self._stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the completion

    def push(self, text: str) -> str:
        """Returns the part of `text` (plus held-back text) that is safe to emit."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        buffer = self._held + text
        # The held text was searched already, so only a match reaching into `text` is new;
        # searching the whole buffer is simpler and the held part is shorter than any stop.
        cut = -1
        for s in self._stop:
            at = buffer.find(s)
            if at != -1 and (cut == -1 or at < cut):
                cut, self.matched = at, s
        if cut != -1:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._partial_stop_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Releases the held-back text at the end of a completion that did not stop here."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_stop_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
