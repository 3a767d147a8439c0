"""A Step turned into device tensors: the flat token batch, positions, attention metadata.

Rows are flattened into one token sequence (decode rows, one token each, then the
prefill chunks). Decode rows read their input token from the device buffer of
last sampled tokens, so no token crosses the host for them. All host-built index
arrays travel to the device in one copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmrpc.engine.kv_cache import KVPool
from llmrpc.engine.step import Step
from llmrpc.kernels.base import AttentionMetadata


def check_kv_room(step_id: int, pool: KVPool, slots: np.ndarray, kv_lens: np.ndarray) -> None:
    """ValueError unless each slot's pages hold its row's `kv_lens` positions."""
    held = pool.slot_num_pages[slots] * pool.page_size
    if np.any(kv_lens > held):
        r = int(np.argmax(kv_lens > held))
        raise ValueError(f"step {step_id}: slot {slots[r]} needs KV room for {kv_lens[r]} tokens "
                         f"but its pages hold {held[r]}")


@dataclass
class ForwardBatch:
    step_id: int
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    attention: AttentionMetadata
    sample_indices: torch.Tensor  # int64 [S] tokens whose logits are sampled (each row's last)
    sample_slots: np.ndarray  # int64 [S] the slot of each sampled row
    sample_positions: np.ndarray  # int64 [S] where each sampled token goes in its sequence (tokens before it)
    graph_size: int = 0  # the captured CUDA-graph batch size this step replays; 0: eager

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, step: Step, pool: KVPool, last_tokens: torch.Tensor, max_context: int) -> ForwardBatch:
        """Reads the pool's page tables as they are after this step's pages were appended."""
        nd, ps = step.num_decode, pool.page_size
        slots = step.slots.astype(np.int64)
        if len(np.unique(slots)) != len(slots):
            raise ValueError(f"step {step.step_id}: a slot appears in more than one row")
        if np.any(step.chunk_lens <= 0):
            raise ValueError(f"step {step.step_id}: empty prefill chunk")
        qo_lens = np.concatenate([np.ones(nd, dtype=np.int64), step.chunk_lens.astype(np.int64)])
        kv_lens = step.starts.astype(np.int64) + qo_lens
        check_kv_room(step.step_id, pool, slots, kv_lens)
        if np.any(kv_lens > max_context):
            raise ValueError(f"step {step.step_id}: a row reaches {kv_lens.max()} tokens, over the context "
                             f"length {max_context}")
        num_tokens = int(qo_lens.sum())
        qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
        row_pages = -(-kv_lens // ps)
        kv_indptr = np.concatenate([[0], np.cumsum(row_pages)])

        token_row = np.repeat(np.arange(len(slots)), qo_lens)
        positions = step.starts.astype(np.int64)[token_row] + (np.arange(num_tokens) - qo_indptr[:-1][token_row])
        page_row = np.repeat(np.arange(len(slots)), row_pages)
        page_cols = np.arange(int(kv_indptr[-1])) - kv_indptr[:-1][page_row]
        table_width = pool.max_pages_per_seq
        kv_table_index = slots[page_row] * table_width + page_cols  # into the flattened page table
        out_table_index = slots[token_row] * table_width + positions // ps
        sample_rows = np.concatenate([np.arange(nd), nd + np.flatnonzero(step.sample_chunks)]).astype(np.int64)
        sample_indices = qo_indptr[sample_rows + 1] - 1

        # One host → device copy for every index array (each copy is a sync point on a GPU).
        host = np.concatenate([positions, kv_table_index, out_table_index, sample_indices, slots[:nd],
                               step.chunk_tokens.astype(np.int64)])
        dev = torch.from_numpy(host).to(pool.device, non_blocking=True)
        sizes = [num_tokens, len(kv_table_index), num_tokens, len(sample_indices), nd, len(step.chunk_tokens)]
        d_positions, d_kv_index, d_out_index, d_sample, d_decode_slots, d_chunk_tokens = dev.split(sizes)
        table = pool.page_table.view(-1)
        out_loc = table[d_out_index].long() * ps + d_positions % ps
        input_ids = torch.cat([last_tokens[d_decode_slots], d_chunk_tokens])
        attention = AttentionMetadata(
            page_size=ps,
            num_decode=nd,
            qo_lens=qo_lens.astype(np.int32),
            kv_lens=kv_lens.astype(np.int32),
            qo_indptr=qo_indptr.astype(np.int32),
            kv_indptr=kv_indptr.astype(np.int32),
            kv_last_page_len=(kv_lens - (row_pages - 1) * ps).astype(np.int32),
            kv_indices=table[d_kv_index],
            out_loc=out_loc,
            positions=d_positions,
        )
        return cls(step.step_id, input_ids, d_positions, attention, d_sample, slots[sample_rows], kv_lens[sample_rows])
