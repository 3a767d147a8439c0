"""PagePool: the free list of KV pages (ids 0..num_pages-1) that the workers hold.

It knows only which pages are free; who owns a used page (a running request or
the radix index) is the Scheduler's bookkeeping.
"""
from __future__ import annotations


class PagePool:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        # A stack: the most recently freed page is reused first; page 0 goes out first.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        taken.reverse()
        return taken

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def free_pages(self) -> list[int]:
        return list(self._free)
