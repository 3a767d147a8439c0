"""KVPages: the bookkeeping of every KV page, the free pool and the radix prefix index as one.

Every page is, at every moment, exactly one of: free (PagePool), held by the radix
index (RadixIndex), or owned by a running request (the tail of its `pages`). The
Scheduler decides who gets pages and when; this class moves pages between those
three owners and keeps each request's page fields (`pages`, `num_cached_pages`,
`radix_node`) true:

- an allocation short of free pages evicts unreferenced radix leaves, LRU first;
- a request admitted on a cached prefix starts with those pages and locks their radix
  path, so they cannot be evicted under it;
- the full prompt pages a request has prefilled are shared through the index while it
  runs (its lock moves down to them);
- a request that leaves (finished or retracted) gives its computed full pages to the
  index, frees the rest and drops its lock.

With the prefix cache off (`--disable-radix-cache`, mini-sglang's `--cache naive`) the
index stays empty: nothing matches, nothing is shared, and a leaving request frees all
its pages.
"""
from __future__ import annotations

from typing import Sequence

from llmrpc.services.scheduler.metrics import SchedulerMetrics
from llmrpc.services.scheduler.pages import PagePool
from llmrpc.services.scheduler.radix import RadixIndex, RadixNode
from llmrpc.services.scheduler.request import Request


class KVPages:
    def __init__(self, num_pages: int, page_size: int, metrics: SchedulerMetrics,
                 prefix_cache: bool = True) -> None:
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        self.pool = PagePool(num_pages)
        self.radix = RadixIndex(page_size)
        self._metrics = metrics

    @property
    def available(self) -> int:
        """Pages an allocation can get now: the free ones and the cached ones no request holds."""
        return self.pool.num_free + self.radix.evictable_pages

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    # ---- the prefix index -------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> tuple[list[int], RadixNode]:
        """The pages of the longest cached prefix of `tokens` (whole pages) and the node ending it."""
        return self.radix.match(tokens if self.prefix_cache else ())

    def match_len(self, tokens: Sequence[int]) -> int:
        return self.radix.match_len(tokens) if self.prefix_cache else 0

    def claim_prefix(self, req: Request, prefix_pages: list[int], node: RadixNode, room: int) -> bool:
        """Starts req's page table on a matched prefix, if `room` more pages stay available beside it.

        The prefix is locked first: its own pages are then no longer counted as evictable room.
        """
        self.radix.lock(node)
        if room > self.available:
            self.radix.unlock(node)
            return False
        req.pages = list(prefix_pages)
        req.num_cached_pages = len(prefix_pages)
        req.radix_node = node
        return True

    def share_prompt_pages(self, req: Request) -> None:
        """Shares the full prompt pages req has prefilled so far through the radix index, while it runs.

        Skipped when another request cached the same content first: the worker's page
        table cannot be rewritten, so req keeps its own copies until it ends.
        """
        full = req.num_fed // self.page_size
        if full <= req.num_cached_pages or not self.prefix_cache:
            return
        key = req.tokens[: full * self.page_size]
        if self.radix.match_len(key) != req.num_cached_pages:
            return
        already, node = self.radix.insert(key, req.pages[:full])
        assert already == req.num_cached_pages
        self.radix.lock(node)
        assert req.radix_node is not None
        self.radix.unlock(req.radix_node)
        req.radix_node = node
        req.num_cached_pages = full

    # ---- a request's own pages ----------------------------------------------------

    def grow(self, req: Request, positions: int) -> list[int]:
        """Appends pages to req's table until it covers `positions` positions; returns the new ones.

        The caller has made sure they are available (`available`).
        """
        new_pages = self._alloc(self.pages_for(positions) - len(req.pages))
        req.pages.extend(new_pages)
        return new_pages

    def release(self, req: Request) -> None:
        """Takes back all of req's pages: computed full pages go into the radix index, the rest are freed."""
        ps = self.page_size
        known = min(req.num_fed, len(req.tokens))  # positions whose KV is written (or in flight) and token known
        full = known // ps if self.prefix_cache else 0
        keep = req.num_cached_pages  # radix pages: not ours to free
        if full > keep:
            already, _ = self.radix.insert(req.tokens[: full * ps], req.pages[:full])
            self.pool.free(req.pages[keep:already])  # our copies of pages the index already had
            keep = full
        self.pool.free(req.pages[keep:])
        if req.radix_node is not None:
            self.radix.unlock(req.radix_node)
        req.pages = []
        req.num_cached_pages = 0
        req.radix_node = None

    def evict_all(self) -> None:
        """Frees every cached page; the caller makes sure no request holds one."""
        self.pool.free(self.radix.evict(self.radix.num_pages))

    def _alloc(self, n: int) -> list[int]:
        short = n - self.pool.num_free
        if short > 0:
            freed = self.radix.evict(short)
            self._metrics.evicted_pages += len(freed)
            self.pool.free(freed)
        return self.pool.alloc(n)
