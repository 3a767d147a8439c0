"""CUDA graphs of pure decode steps: capture once per batch size, replay with fresh inputs.

A decode step of B rows replays the graph of the smallest captured size >= B.
The graph reads its inputs (token ids, positions, where new K/V go) from fixed
buffers and writes logits to a fixed output; the attention backend refills its
own fixed index buffers in `plan_graph()` before each replay. Padded rows feed
token 0 at position 0 and store their K/V in a scratch page that no request
owns, attending only to it, so they can never touch a real sequence.
Prefill and mixed steps run eagerly: their shapes vary too much to capture.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from llmrpc.engine.forward_batch import ForwardBatch
from llmrpc.engine.kv_cache import KVPool
from llmrpc.kernels.base import AttentionMetadata

if TYPE_CHECKING:
    from llmrpc.engine.models.llama import LlamaForCausalLM
    from llmrpc.kernels.flashinfer_backend import FlashInferAttentionBackend


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_bs (and max_bs itself): padding wastes < 16 rows."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, attention: FlashInferAttentionBackend, kv_pool: KVPool, scratch_page: int,
                 max_bs: int) -> None:
        self.model = model
        self.attention = attention
        self.page_size = kv_pool.page_size
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        device = kv_pool.device
        self.scratch_loc = scratch_page * kv_pool.page_size
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.out_loc = torch.full((self.max_bs,), self.scratch_loc, dtype=torch.long, device=device)
        self.pad_pages = torch.full((self.max_bs,), scratch_page, dtype=torch.int32, device=device)
        # A batch lists at most every page of the pool once, plus one scratch page per padded row.
        attention.init_graphs(self.sizes, kv_pool.num_pages + self.max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _padded_metadata(self, m: AttentionMetadata, bs: int) -> AttentionMetadata:
        pad = bs - m.num_rows
        ones = np.ones(pad, dtype=np.int32)
        return AttentionMetadata(
            page_size=m.page_size, num_decode=bs,
            qo_lens=np.concatenate([m.qo_lens, ones]),
            kv_lens=np.concatenate([m.kv_lens, ones]),
            qo_indptr=np.arange(bs + 1, dtype=np.int32),
            kv_indptr=np.concatenate([m.kv_indptr, m.kv_indptr[-1] + np.arange(1, pad + 1, dtype=np.int32)]),
            kv_last_page_len=np.concatenate([m.kv_last_page_len, ones]),
            kv_indices=torch.cat([m.kv_indices, self.pad_pages[:pad]]) if pad else m.kv_indices,
            out_loc=self.out_loc[:bs],
            positions=self.positions[:bs],
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.attention)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        empty = AttentionMetadata(
            page_size=self.page_size, num_decode=0, qo_lens=np.zeros(0, np.int32), kv_lens=np.zeros(0, np.int32),
            qo_indptr=np.zeros(1, np.int32), kv_indptr=np.zeros(1, np.int32),
            kv_last_page_len=np.zeros(0, np.int32), kv_indices=self.pad_pages[:0],
            out_loc=self.out_loc[:0], positions=self.positions[:0])
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Largest first, so smaller graphs reuse the memory pool the largest one grew.
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):
                self.attention.plan_graph(self._padded_metadata(empty, bs), self.out_loc[:bs])
                self._forward(bs)  # warm-up outside the graph (lazy inits, kernel selection)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[bs] = self._forward(bs)
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def can_run(self, batch: ForwardBatch) -> bool:
        m = batch.attention
        return m.num_decode == m.num_rows and 0 < m.num_rows <= self.max_bs

    def plan(self, batch: ForwardBatch) -> int:
        """Fills the graph's inputs for `batch` and plans its attention; returns the padded size."""
        m = batch.attention
        n = m.num_rows
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_loc[:n].copy_(m.out_loc)
        if bs > n:
            # Stale ids and positions of a larger batch are harmless; stale K/V targets are not.
            self.out_loc[n:bs].fill_(self.scratch_loc)
        self.attention.plan_graph(self._padded_metadata(m, bs), self.out_loc[:bs])
        return bs

    def replay(self, bs: int, num_rows: int) -> torch.Tensor:
        """Logits [num_rows, vocab] of the planned batch."""
        self.graphs[bs].replay()
        return self.logits[bs][:num_rows]
