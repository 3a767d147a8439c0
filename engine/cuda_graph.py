"""CUDA graphs of pure decode steps: capture once per batch size, replay with fresh inputs.

A decode step of B rows replays the graph of the smallest captured size >= B.
The graph reads its inputs (token ids, positions, where new K/V go) from fixed
buffers and writes logits to a fixed output; the attention backend refills its
own fixed index buffers in `plan_graph()` before each replay. Padded rows feed
token 0 at position 0 and store their K/V in a scratch page that no request
owns, attending only to it, so they can never touch a real sequence.

Prefill steps (no decode row) of up to `prefill_graph_max_tokens` tokens replay graphs
too, piecewise (PrefillGraphs): an eager prefill costs the host more time launching its
kernels than the GPU takes to run them (bench/profile_prefill.py), and everything but
attention works token by token, so it can be captured at a padded token count. Each
layer's work before and after attention is one graph; at each attention the graph stores
the new K/V into the pages at a fixed `out_loc` buffer (padded tokens' into the scratch
page) and copies q, k and v into fixed buffers; between replays only FlashInfer's prefill
runs eagerly, on the step's own plan over the real tokens, writing straight into the fixed
output the next graph reads. Padded tokens are computed and never attended to. Mixed
steps run eagerly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from llmrpc.engine.forward_batch import ForwardBatch
from llmrpc.engine.kv_cache import KVPool
from llmrpc.kernels import fused
from llmrpc.kernels.base import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from llmrpc.engine.models.llama import LlamaAttention, LlamaForCausalLM
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
        attention.init_graphs(self.sizes, kv_pool.num_pages + self.max_bs, self.out_loc)
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
        self.attention.fused_decode = None  # the last capture's; the next step plans its own
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


def prefill_capture_sizes(max_tokens: int) -> list[int]:
    """256, 512, 1024, ... below max_tokens, then max_tokens: a prefill pads to at most twice its tokens."""
    return [s for s in (256, 512, 1024, 2048, 4096, 8192, 16384) if s < max_tokens] + [max_tokens]


class _Cut(AttentionBackend):
    """What a prefill graph is captured against: at each layer's attention, the new K/V go into the pages
    at the fixed `out_loc` and q, k and v to the fixed buffers, the layer's graph ends and the next begins;
    the returned output is the fixed buffer that the eager attention fills between replays. Without
    `pool` nothing is captured (the warm-up)."""

    def __init__(self, graphs: PrefillGraphs, tokens: int, pool: object | None) -> None:
        self.graphs, self.tokens, self.pool = graphs, tokens, pool
        self.segments: list[torch.cuda.CUDAGraph] = []
        self.layers: list[int] = []
        self._graph: torch.cuda.CUDAGraph | None = None

    def plan(self, metadata: AttentionMetadata) -> None:
        raise AssertionError("a prefill graph's attention is planned eagerly, per step")

    def begin(self) -> None:
        if self.pool is not None:
            self._graph = torch.cuda.CUDAGraph()
            self._graph.capture_begin(pool=self.pool)  # type: ignore[arg-type]  # graph_pool_handle()'s

    def end(self) -> None:
        if self._graph is not None:
            self._graph.capture_end()
            self.segments.append(self._graph)
            self._graph = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        g, n = self.graphs, self.tokens
        kv = g.attention.kv_pool
        fused.store_kv(kv.k[layer_id], kv.v[layer_id], g.out_loc[:n], k, v)
        g.q[:n].copy_(q)
        g.k[:n].copy_(k)
        g.v[:n].copy_(v)
        self.end()
        self.layers.append(layer_id)
        self.begin()
        return g.o[:n]


class PrefillGraphs:
    """Piecewise graphs of prefill steps at each of `sizes` tokens (see the module docstring)."""

    def __init__(self, model: LlamaForCausalLM, attention: FlashInferAttentionBackend, max_tokens: int,
                 scratch_page: int, device: torch.device) -> None:
        self.model = model
        self.attention = attention
        self.sizes = prefill_capture_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.scratch_loc = scratch_page * attention.kv_pool.page_size
        # Where each token's K/V go: the step's out_loc, then the scratch page's first slot for padded tokens.
        self.out_loc = torch.full((self.max_tokens,), self.scratch_loc, dtype=torch.long, device=device)
        attn0 = cast("LlamaAttention", model.model.layers[0].self_attn)
        heads, kv_heads, head_dim = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
        dtype = model.lm_head.weight.dtype
        self.input_ids = torch.zeros(self.max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_tokens, dtype=torch.long, device=device)
        self.q = torch.zeros(self.max_tokens, heads, head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(self.max_tokens, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(self.max_tokens, kv_heads, head_dim, dtype=dtype, device=device)
        self.o = torch.zeros(self.max_tokens, heads, head_dim, dtype=dtype, device=device)
        self.segments: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.layers: dict[int, list[int]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Largest first, so smaller graphs reuse the memory pool the largest one grew; the graphs of one
        # size share it too, which holds because they replay in the order they were captured.
        with torch.cuda.stream(stream):
            for n in reversed(self.sizes):
                self.model(self.input_ids[:n], self.positions[:n], _Cut(self, n, None))  # warm-up
                stream.synchronize()
                cut = _Cut(self, n, pool)
                cut.begin()
                try:
                    self.hidden[n] = self.model(self.input_ids[:n], self.positions[:n], cut)
                finally:
                    cut.end()  # a capture that failed is ended too, so the stream leaves capture mode
                self.segments[n], self.layers[n] = cut.segments, cut.layers
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def size_for(self, batch: ForwardBatch) -> int:
        """The captured size a step replays, or 0: it runs eagerly (decode rows, or too many tokens)."""
        n = batch.num_tokens
        if batch.attention.num_decode or not 0 < n <= self.max_tokens:
            return 0
        return next(s for s in self.sizes if s >= n)

    def replay(self, batch: ForwardBatch, size: int) -> torch.Tensor:
        """Final hidden states [tokens, hidden] of a prefill step whose attention `plan()` has planned."""
        n = batch.num_tokens
        self.input_ids[:n].copy_(batch.input_ids)  # stale ids and positions past n are harmless
        self.positions[:n].copy_(batch.positions)
        self.out_loc[:n].copy_(batch.attention.out_loc)  # stale K/V targets are not
        self.out_loc[n:size].fill_(self.scratch_loc)
        q, k, v, o = self.q[:n], self.k[:n], self.v[:n], self.o[:n]
        segments, layers = self.segments[size], self.layers[size]
        for segment, layer_id in zip(segments, layers):
            segment.replay()
            self.attention.attend(q, k, v, layer_id, out=o)
        segments[-1].replay()
        return self.hidden[size][:n]
