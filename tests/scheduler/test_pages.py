"""PagePool: a free list that hands out each page once until it is given back."""
from __future__ import annotations

import pytest

from llmrpc.services.scheduler.pages import PagePool


def test_alloc_and_free():
    pool = PagePool(4)
    assert pool.alloc(2) == [0, 1] and pool.num_free == 2
    assert pool.alloc(0) == []
    with pytest.raises(MemoryError):
        pool.alloc(3)
    pool.free([1])
    assert pool.alloc(1) == [1]  # the most recently freed page goes out first
    assert sorted(pool.alloc(2)) == [2, 3] and pool.num_free == 0
    pool.free([0, 1, 2, 3])
    assert sorted(pool.free_pages()) == [0, 1, 2, 3]
