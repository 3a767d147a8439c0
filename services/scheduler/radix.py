"""RadixIndex: the prefix cache, a radix tree over token ids whose nodes own KV pages.

Keys are page-granular: a node's key is a whole number of pages of tokens and it
owns exactly those pages, so only full pages are ever shared. Children are keyed
by their first page of tokens, which makes every split land on a page boundary.

A node's `lock_ref` counts the running requests that use it or a descendant
(locking walks up to the root), so a node with lock_ref 0 has no locked
descendant either and its pages are evictable. Eviction takes the least
recently used unlocked leaf, trimming pages off its tail when only part of it
is needed. The candidates live in a heap kept up to date as leaves are made,
touched and unlocked (stale entries are skipped when popped), because with a
full cache every new page of every decode step evicts: a scan of the whole tree
each time would cost more than the rest of the step.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Iterator, Sequence


class RadixNode:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: RadixNode | None) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0


class RadixIndex:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = RadixNode((), [], None)
        self.num_pages = 0  # pages held by the index
        self.evictable_pages = 0  # of those, pages in nodes no running request locks
        self._clock = 0  # logical time for LRU
        # (last_access, push order, node) for every unlocked leaf, plus stale entries skipped on pop
        self._lru: list[tuple[int, int, RadixNode]] = []
        self._pushes = itertools.count()

    # ---- lookups ------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> tuple[list[int], RadixNode]:
        """The pages of the longest cached page-aligned prefix of `tokens`, and the node it ends at.

        Splits a node when the match ends inside it, so the returned node covers
        exactly the match and can be locked. Refreshes the path's LRU time.
        """
        key = self._page_aligned(tokens)
        now = self._tick()
        node, i, pages = self.root, 0, []
        while i < len(key):
            child = node.children.get(key[i:i + self.page_size])
            if child is None:
                break
            n = self._common_prefix(child.key, key, i)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pages.extend(child.pages)
            node, i = child, i + n
        self._track(node)
        return pages, node

    def match_len(self, tokens: Sequence[int]) -> int:
        """Pages `match` would return, without changing the tree or its LRU times."""
        key = self._page_aligned(tokens)
        node, i = self.root, 0
        while i < len(key):
            child = node.children.get(key[i:i + self.page_size])
            if child is None:
                break
            n = self._common_prefix(child.key, key, i)
            i += n
            if n < len(child.key):
                break
            node = child
        return i // self.page_size

    # ---- insertion ----------------------------------------------------------

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[int, RadixNode]:
        """Caches `pages` (one per full page of `tokens`) and returns (pages already cached, end node).

        The index keeps its own pages for the prefix it already had: the caller still
        owns its pages for that prefix (pages[:already]) and frees the ones it does
        not share with the index. Pages after the prefix now belong to the index.
        """
        key = tuple(tokens)
        ps = self.page_size
        if len(key) % ps or len(key) // ps != len(pages):
            raise ValueError(f"insert needs one page per {ps} tokens: {len(key)} tokens, {len(pages)} pages")
        now = self._tick()
        node, i = self.root, 0
        while i < len(key):
            child = node.children.get(key[i:i + ps])
            if child is None:
                leaf = RadixNode(key[i:], list(pages[i // ps:]), node)
                leaf.last_access = now
                node.children[key[i:i + ps]] = leaf
                self.num_pages += len(leaf.pages)
                self.evictable_pages += len(leaf.pages)
                self._track(leaf)
                return i // ps, leaf
            n = self._common_prefix(child.key, key, i)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, i = child, i + n
        self._track(node)
        return len(key) // ps, node

    # ---- locking ------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """A running request uses node's pages (and its ancestors'): none of them may be evicted."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise AssertionError("radix unlock without a matching lock")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
                self._track(node)
            node = node.parent  # type: ignore[assignment]

    # ---- eviction -----------------------------------------------------------

    def evict(self, num_pages: int) -> list[int]:
        """Frees up to `num_pages` pages from unlocked leaves, least recently used first."""
        ps = self.page_size
        freed: list[int] = []
        while len(freed) < num_pages and self._lru:
            last_access, _, leaf = heapq.heappop(self._lru)
            if leaf.parent is None or leaf.children or leaf.lock_ref or leaf.last_access != last_access:
                continue  # stale: evicted, grown, locked or touched since it was pushed
            take = min(num_pages - len(freed), len(leaf.pages))
            if take < len(leaf.pages):  # trim the tail, keep the leaf
                freed.extend(leaf.pages[-take:])
                del leaf.pages[-take:]
                leaf.key = leaf.key[: len(leaf.key) - take * ps]
                self._track(leaf)
            else:
                freed.extend(leaf.pages)
                parent = leaf.parent
                del parent.children[leaf.key[:ps]]
                leaf.parent = None
                self._track(parent)
            self.num_pages -= take
            self.evictable_pages -= take
        return freed

    # ---- introspection ------------------------------------------------------

    def all_pages(self) -> list[int]:
        return [p for n in self.nodes() for p in n.pages]

    def check(self) -> None:
        """Structural invariants: page-aligned keys, child keys, counters. Raises AssertionError."""
        ps = self.page_size
        total = evictable = 0
        for node in self.nodes():
            assert node.key and len(node.key) % ps == 0, f"radix node key of {len(node.key)} tokens is not whole pages"
            assert len(node.pages) * ps == len(node.key), "radix node holds the wrong number of pages"
            assert node.parent is not None and node.parent.children.get(node.key[:ps]) is node, "radix node is not under its first page"
            child_locks = sum(c.lock_ref for c in node.children.values())
            assert node.lock_ref >= child_locks, "radix node is locked less than its children"
            total += len(node.pages)
            evictable += len(node.pages) if node.lock_ref == 0 else 0
        assert total == self.num_pages, f"radix holds {total} pages, counter says {self.num_pages}"
        tracked = {id(n) for t, _, n in self._lru
                   if n.parent is not None and not n.children and n.lock_ref == 0 and n.last_access == t}
        for node in self.nodes():
            if not node.children and node.lock_ref == 0:
                assert id(node) in tracked, "an unlocked radix leaf is missing from the LRU heap"
        assert evictable == self.evictable_pages, f"radix has {evictable} evictable pages, counter says {self.evictable_pages}"

    # ---- internals ----------------------------------------------------------

    def _track(self, node: RadixNode) -> None:
        """Makes node an eviction candidate if it is an unlocked leaf (call after its time changes)."""
        if node.lock_ref == 0 and not node.children and node is not self.root:
            heapq.heappush(self._lru, (node.last_access, next(self._pushes), node))
            if len(self._lru) > 2 * self.num_pages + 64:  # mostly stale: rebuild from the tree
                self._lru = [(n.last_access, next(self._pushes), n)
                             for n in self.nodes() if not n.children and n.lock_ref == 0]
                heapq.heapify(self._lru)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _page_aligned(self, tokens: Sequence[int]) -> tuple[int, ...]:
        return tuple(tokens[: len(tokens) // self.page_size * self.page_size])

    def _common_prefix(self, node_key: tuple[int, ...], key: tuple[int, ...], i: int) -> int:
        """Tokens (whole pages) that node_key shares with key[i:]; the first page is known to match."""
        n = min(len(node_key), len(key) - i)
        if key[i:i + n] == node_key[:n]:
            return n
        ps = self.page_size
        j = ps
        while j < n and key[i + j:i + j + ps] == node_key[j:j + ps]:
            j += ps
        return j

    def _split(self, node: RadixNode, n: int) -> RadixNode:
        """Cuts node after n tokens; returns the new upper part, which inherits locks and LRU time."""
        ps = self.page_size
        parent = node.parent
        assert parent is not None
        upper = RadixNode(node.key[:n], node.pages[: n // ps], parent)
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        node.key = node.key[n:]
        node.pages = node.pages[n // ps:]
        node.parent = upper
        upper.children[node.key[:ps]] = node
        parent.children[upper.key[:ps]] = upper
        return upper

    def nodes(self) -> Iterator[RadixNode]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
