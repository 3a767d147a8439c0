"""RadixIndex: exact unit cases, and a property test against a naive dict-of-prefixes model."""
from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from llmrpc.services.scheduler.radix import RadixIndex


def test_match_returns_the_longest_page_aligned_prefix_and_splits_there():
    radix = RadixIndex(page_size=2)
    already, leaf = radix.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    assert already == 0 and leaf.pages == [10, 11, 12]
    assert radix.insert([1, 2, 3, 4, 5, 6], [20, 21, 22]) == (3, leaf)
    pages, node = radix.match([1, 2, 3, 4, 9, 9, 9])
    assert pages == [10, 11]
    assert node.key == (1, 2, 3, 4) and node.parent is radix.root
    assert [c.key for c in node.children.values()] == [(5, 6)]
    pages, upper = radix.match([1, 2, 3])  # a partial last page never matches
    assert pages == [10] and upper.key == (1, 2) and node.key == (3, 4) and node.parent is upper
    assert radix.match([7, 7]) == ([], radix.root)
    radix.check()


def test_insert_reports_the_prefix_it_already_had_and_keeps_its_own_pages():
    radix = RadixIndex(page_size=2)
    radix.insert([1, 2, 3, 4], [10, 11])
    already, node = radix.insert([1, 2, 3, 4, 5, 6, 7, 8], [20, 21, 22, 23])
    assert already == 2 and node.key == (5, 6, 7, 8) and node.pages == [22, 23]
    already, node = radix.insert([1, 2, 9, 9], [30, 31])
    assert already == 1 and node.pages == [31]
    assert sorted(radix.all_pages()) == [10, 11, 22, 23, 31]
    assert radix.num_pages == radix.evictable_pages == 5
    radix.check()


def test_locked_pages_are_not_evicted_and_eviction_is_lru_trimming_leaf_tails():
    radix = RadixIndex(page_size=1)
    radix.insert([1, 2, 3], [10, 11, 12])
    radix.insert([5, 6], [15, 16])
    radix.insert([1, 2, 4], [10, 11, 14])
    _, node = radix.match([5, 6])  # now the most recently used
    radix.lock(node)
    assert radix.num_pages == 6 and radix.evictable_pages == 4
    assert radix.evict(1) == [12]  # LRU leaf [1,2,3]: its tail page
    assert radix.evict(2) == [14, 11]  # then leaf [1,2,4] and, emptied, the shared [1,2] above it
    assert radix.evict(10) == [10]  # [5,6] is locked
    assert sorted(radix.all_pages()) == [15, 16] and radix.evictable_pages == 0
    radix.unlock(node)
    assert radix.evict(10) == [15, 16] and radix.num_pages == 0
    radix.check()


class NaiveIndex:
    """The reference: every cached page-aligned prefix maps to the page holding its last page."""

    def __init__(self, page_size: int) -> None:
        self.ps = page_size
        self.page: dict[tuple[int, ...], int] = {}
        self.time: dict[tuple[int, ...], int] = {}
        self.locks: Counter[tuple[int, ...]] = Counter()
        self.clock = 0

    def prefixes(self, tokens: list[int]) -> list[tuple[int, ...]]:
        return [tuple(tokens[:k]) for k in range(self.ps, len(tokens) + 1, self.ps)]

    def match(self, tokens: list[int]) -> list[tuple[int, ...]]:
        self.clock += 1
        hit = []
        for p in self.prefixes(tokens):
            if p not in self.page:
                break
            hit.append(p)
            self.time[p] = self.clock
        return hit

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        self.clock += 1
        already = 0
        for p, page in zip(self.prefixes(tokens), pages):
            if p in self.page:
                already += 1
            else:
                self.page[p] = page
            self.time[p] = self.clock
        return already

    def is_leaf(self, p: tuple[int, ...]) -> bool:
        return not any(len(q) == len(p) + self.ps and q[: len(p)] == p for q in self.page)

    def evict(self, n: int) -> list[int]:
        freed = []
        while len(freed) < n:
            leaves = [p for p in self.page if self.locks[p] == 0 and self.is_leaf(p)]
            if not leaves:
                break
            p = min(leaves, key=self.time.__getitem__)
            freed.append(self.page.pop(p))
            del self.time[p]
        return freed


def tree_contents(radix: RadixIndex) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    stack = [((), radix.root)]
    while stack:
        prefix, node = stack.pop()
        for child in node.children.values():
            key = prefix + child.key
            for j, page in enumerate(child.pages):
                out[key[: len(prefix) + (j + 1) * radix.page_size]] = page
            stack.append((key, child))
    return out


tokens = st.lists(st.integers(0, 2), max_size=10)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), tokens),
        st.tuples(st.just("match"), tokens, st.booleans()),
        st.tuples(st.just("unlock"), st.integers(0, 50)),
        st.tuples(st.just("evict"), st.integers(0, 6)),
        st.tuples(st.just("match_len"), tokens),
    ),
    max_size=80,
)


@settings(max_examples=2000, deadline=None)
@given(page_size=st.integers(1, 3), ops=ops)
def test_radix_agrees_with_a_naive_prefix_dict(page_size: int, ops: list[tuple]) -> None:
    radix, naive = RadixIndex(page_size), NaiveIndex(page_size)
    held = []  # (tree node, naive prefixes) for every lock taken
    next_page = 0
    for op in ops:
        kind = op[0]
        if kind == "insert":
            toks = op[1][: len(op[1]) // page_size * page_size]
            pages = list(range(next_page, next_page + len(toks) // page_size))
            next_page += len(pages)
            already, _ = radix.insert(toks, pages)
            assert already == naive.insert(toks, pages)
        elif kind == "match":
            pages, node = radix.match(op[1])
            hit = naive.match(op[1])
            assert pages == [naive.page[p] for p in hit]
            assert [p for n in reversed(list(iter_path(radix, node))) for p in n.pages] == pages
            if op[2]:
                radix.lock(node)
                naive.locks.update(hit)
                held.append((node, hit))
        elif kind == "unlock" and held:
            node, hit = held.pop(op[1] % len(held))
            radix.unlock(node)
            naive.locks.subtract(hit)
        elif kind == "evict":
            assert sorted(radix.evict(op[1])) == sorted(naive.evict(op[1]))
        elif kind == "match_len":
            expected = 0
            for p in naive.prefixes(op[1]):
                if p not in naive.page:
                    break
                expected += 1
            assert radix.match_len(op[1]) == expected
        radix.check()
        assert tree_contents(radix) == naive.page
        assert radix.num_pages == len(naive.page)
        assert radix.evictable_pages == sum(1 for p in naive.page if naive.locks[p] == 0)


def iter_path(radix: RadixIndex, node):
    while node is not radix.root:
        yield node
        node = node.parent
