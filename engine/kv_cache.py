"""The paged KV cache of one worker rank: the page pool and each slot's page table.

K and V of layer l are tensors [num_pages, page_size, kv_heads_local, head_dim].
The scheduler owns page allocation; this pool only stores what it is told: each
running request holds a slot, and the slot's page table lists the pages of its
sequence in order (admission resets it, each step appends the pages it
allocated). The table lives on the device so attention can read it without a
host round trip; page counts per slot are mirrored on the host to build indices.

The pages are stored in the model dtype or, with `--kv-cache-dtype fp8_e4m3`, in
float8_e4m3fn (one byte per element, scale 1.0): half the bytes of bf16 per token,
so the same memory holds twice the tokens. Backends cast on store (saturating,
kernels/fused.py `to_kv_dtype`) and read the pages as `compute_dtype`.
"""
from __future__ import annotations

import numpy as np
import torch

from llmrpc.engine.config import EngineConfig
from llmrpc.kernels.fused import fp8_max

# Without a GPU there is no free-memory reading to size from: a fixed budget instead.
CPU_KV_BUDGET_BYTES = 1 << 30
CPU_DEFAULT_MAX_TOKENS = 65536


def kv_cache_dtype(config: EngineConfig) -> torch.dtype:
    """The dtype the pages are stored in: the model's, or float8_e4m3fn for `--kv-cache-dtype fp8_e4m3`."""
    dtype = getattr(torch, config.kv_cache_dtype_name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def plan_num_pages(config: EngineConfig, bytes_per_token: int) -> int:
    """How many pages the pool gets: from free GPU memory (or the CPU budget), capped by max_total_tokens."""
    if config.is_cuda:
        free, _total = torch.cuda.mem_get_info(torch.device(config.device))
        tokens = int(free * config.kv_memory_fraction) // bytes_per_token
        if config.max_total_tokens:
            tokens = min(tokens, config.max_total_tokens)
    elif config.max_total_tokens:
        tokens = config.max_total_tokens
    else:
        tokens = min(CPU_DEFAULT_MAX_TOKENS, CPU_KV_BUDGET_BYTES // bytes_per_token)
    num_pages = tokens // config.page_size
    if num_pages < 1:
        raise ValueError(f"no room for a single KV page of {config.page_size} tokens "
                         f"({bytes_per_token} bytes per token, budget {tokens} tokens)")
    return num_pages


class KVPool:
    """`dtype` is what the pages store; `compute_dtype` what attention reads them as (default: `dtype`)."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 max_slots: int, max_context: int, dtype: torch.dtype, device: torch.device | str,
                 compute_dtype: torch.dtype | None = None) -> None:
        self.num_pages = num_pages
        self.dtype = dtype
        self.compute_dtype = compute_dtype or dtype
        self.page_size = page_size
        self.max_slots = max_slots
        self.max_pages_per_seq = -(-max_context // page_size)
        self.device = torch.device(device)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # Zeros, not empty: padded gathers read unused slots, and garbage NaNs would leak through 0-weights.
        # A float8 pool is allocated as bytes and viewed (zero bytes are +0.0): no float8 fill kernel needed.
        alloc = torch.uint8 if fp8_max(dtype) is not None else dtype
        self.k = [torch.zeros(shape, dtype=alloc, device=self.device).view(dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=alloc, device=self.device).view(dtype) for _ in range(num_layers)]
        self.page_table = torch.zeros((max_slots, self.max_pages_per_seq), dtype=torch.int32, device=self.device)
        self.slot_num_pages = np.zeros(max_slots, dtype=np.int64)
        self.slot_lens = np.zeros(max_slots, dtype=np.int64)  # KV tokens written, after the last step

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def reset_slot(self, slot: int) -> None:
        """A new request takes `slot`: its page table and length start empty."""
        self._check_slots(np.asarray([slot]))
        self.slot_num_pages[slot] = 0
        self.slot_lens[slot] = 0

    def append_pages(self, slots: np.ndarray, counts: np.ndarray, page_ids: np.ndarray) -> None:
        """Row i appends the next `counts[i]` of `page_ids` to the page table of `slots[i]`."""
        total = int(counts.sum())
        if total != len(page_ids):
            raise ValueError(f"page_counts sum to {total} but {len(page_ids)} page ids were sent")
        if total == 0:
            return
        self._check_slots(slots)
        if page_ids.min() < 0 or page_ids.max() >= self.num_pages:
            raise ValueError(f"page id out of range [0, {self.num_pages}): {page_ids.min()}..{page_ids.max()}")
        counts = counts.astype(np.int64)
        new_counts = self.slot_num_pages[slots] + counts
        if new_counts.max() > self.max_pages_per_seq:
            slot = int(slots[np.argmax(new_counts)])
            raise ValueError(f"slot {slot} would hold {new_counts.max()} pages, over the context limit "
                             f"of {self.max_pages_per_seq} pages")
        row_of_page = np.repeat(np.arange(len(slots)), counts)
        cols = self.slot_num_pages[slots][row_of_page] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
        rows = slots.astype(np.int64)[row_of_page]
        flat = torch.from_numpy(rows * self.max_pages_per_seq + cols).to(self.device, non_blocking=True)
        self.page_table.view(-1)[flat] = torch.from_numpy(page_ids.astype(np.int32)).to(self.device, non_blocking=True)
        self.slot_num_pages[slots] = new_counts

    def _check_slots(self, slots: np.ndarray) -> None:
        if len(slots) and (slots.min() < 0 or slots.max() >= self.max_slots):
            raise ValueError(f"slot out of range [0, {self.max_slots}): {slots.min()}..{slots.max()}")
