"""KVPool: page tables grow by what each step appends, reset at admission, refuse bad input; sizing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrpc.engine.config import EngineConfig
from llmrpc.engine.kv_cache import CPU_KV_BUDGET_BYTES, KVPool, plan_num_pages


def _pool() -> KVPool:
    return KVPool(num_layers=2, num_pages=10, page_size=4, num_kv_heads=2, head_dim=8, max_slots=3,
                  max_context=16, dtype=torch.float32, device="cpu")


def _i32(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int32)


def test_pages_append_in_order_and_reset_on_admission() -> None:
    pool = _pool()
    assert pool.k[0].shape == (10, 4, 2, 8) and len(pool.v) == 2 and pool.max_pages_per_seq == 4
    pool.append_pages(np.array([2, 0]), _i32(2, 1), _i32(7, 3, 5))
    pool.append_pages(np.array([0, 2]), _i32(2, 0), _i32(9, 1))
    assert pool.page_table[2, :2].tolist() == [7, 3] and pool.page_table[0, :3].tolist() == [5, 9, 1]
    assert pool.slot_num_pages.tolist() == [3, 0, 2]
    pool.reset_slot(0)
    pool.append_pages(np.array([0]), _i32(1), _i32(4))
    assert pool.page_table[0, 0].item() == 4 and pool.slot_num_pages[0] == 1


def test_bad_page_input_is_refused() -> None:
    pool = _pool()
    with pytest.raises(ValueError, match="page id out of range"):
        pool.append_pages(np.array([0]), _i32(1), _i32(10))
    with pytest.raises(ValueError, match="over the context limit"):
        pool.append_pages(np.array([1]), _i32(5), _i32(0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match="sum to 2 but 1 page ids"):
        pool.append_pages(np.array([1]), _i32(2), _i32(0))
    with pytest.raises(ValueError, match="slot out of range"):
        pool.append_pages(np.array([3]), _i32(1), _i32(0))


def test_pool_size_from_budget_or_cap() -> None:
    per_token = KVPool.bytes_per_token(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float32)
    assert per_token == 2 * 30 * 3 * 64 * 4
    capped = EngineConfig(model_path="m", page_size=16, max_total_tokens=1000)
    assert plan_num_pages(capped, per_token) == 1000 // 16
    default = EngineConfig(model_path="m", page_size=16)
    assert plan_num_pages(default, per_token) == min(65536, CPU_KV_BUDGET_BYTES // per_token) // 16
    with pytest.raises(ValueError, match="no room for a single KV page"):
        plan_num_pages(EngineConfig(model_path="m", page_size=16, max_total_tokens=8), per_token)
