"""Paged attention on NVIDIA GPUs through FlashInfer: one plan per step, one kernel per layer.

A step with prefill chunks (alone or mixed with decode rows) runs FlashInfer's
batch prefill kernel over the pages, causal within each row's new tokens and
open over its cached prefix (FlashInfer aligns the causal mask to the end of the
KV, which is exactly "query i sits at position prefix + i"). With a 16-bit pool, a
prefill step in which no row has a cached prefix attends over the step's own K/V
instead (the ragged kernel: no page gather). Prefill kernels are FlashAttention-3's
Hopper ones (fa3) or fa2's, by `prefill` (EngineConfig.flashinfer_prefill): on an H200,
fa3 takes a 2,048-token prompt's attention from 100 to 47 µs a layer
(bench/attention_backends.py). fa3 builds head dims 64, 128 and 256; auto takes fa2 for others.
A pure decode step runs the batch decode kernel on tensor cores (`decode`: EngineConfig.flashinfer_decode).
CUDA cores, which mini-sglang takes below 4 query heads a KV head, measured 3% faster for one
layer's kernel at 256 rows on Qwen3-0.6B's 16/8 heads (bench/attention_backends.py) but 5% slower
over the offline workload, captured in decode graphs (run 22); on Qwen3-8B's 32/8 they are 39%
slower for the kernel alone.
New K/V go into the pages at the step's `out_loc` in one launch (kernels/fused.py `store_kv`).

With a float8 pool (--kv-cache-dtype fp8_e4m3) every wrapper reads the pages, planned with
`kv_data_type` float8_e4m3fn and `q_data_type` the model dtype: FlashInfer's FP8 paged
attention (fa2 kernels, scale 1.0) reads them as they are stored. The ragged kernel is not
used then, so a prompt attends over the same FP8 values whether its prefix was cached or not.

For CUDA graphs the backend keeps one decode wrapper per captured batch size,
each with fixed index buffers that `plan_graph()` refills before a replay; the
captured kernels read those buffers, so the graph never changes. Graphs of up to
`fused_decode_max_rows` rows (EngineConfig) run no FlashInfer kernel: each layer's
attention, with the Q/K norm, RoPE and K/V store before it, is one launch of
kernels/triton_decode.py over the same buffers, which plan_graph() fills without a plan.

`flashinfer` is imported here only: the CPU build never needs it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmrpc.kernels import fused, triton_decode
from llmrpc.kernels.base import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from llmrpc.engine.kv_cache import KVPool

log = logging.getLogger("llmrpc.attention")

# FlashInfer's split-KV partial results; shared by every wrapper (steps run one at a time, in stream order).
WORKSPACE_BYTES = 256 << 20


class _GraphDecode:
    """A decode wrapper bound to fixed buffers for one captured batch size; at a few rows, the fused
    decode kernel over the same buffers instead (`fused`)."""

    def __init__(self, flashinfer, workspace: torch.Tensor, bs: int, max_pages: int, device: torch.device,
                 tensor_cores: bool) -> None:
        self.indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(bs, dtype=torch.int32, device=device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len,
        )
        self.fused: triton_decode.FusedDecode | None = None
        self.staged: torch.Tensor | None = None  # the fused path's indptr and last page lengths (pinned)
        # plan() stages its schedule in a pinned host buffer and copies it asynchronously, as the fused
        # path does `staged`; the next plan must not overwrite either before the GPU has read it.
        self.planned = torch.cuda.Event()
        self.planned_once = False


FA3_HEAD_DIMS = (64, 128, 256)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)  # pools fa3 and the ragged kernel read; FP8 goes through fa2's pages


def prefill_kernels(choice: str, device: torch.device, kv_dtype: torch.dtype, head_dim: int) -> str:
    """"fa3" or "fa2" for EngineConfig.flashinfer_prefill's `choice`; auto: fa3 on sm90 with a 16-bit pool
    and a head dim fa3 builds. An explicit fa3 this GPU cannot run is refused, naming the flag."""
    if choice == "fa2":
        return choice
    if choice == "auto" and (kv_dtype not in SIXTEEN_BIT or head_dim not in FA3_HEAD_DIMS):
        return "fa2"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0) and head_dim in FA3_HEAD_DIMS:
        return "fa3"
    if choice == "fa3":
        raise ValueError(f"flashinfer_prefill (--flashinfer-prefill) fa3 needs an sm90 (Hopper) GPU and a head dim in "
                         f"{FA3_HEAD_DIMS}, not sm{major}{minor} and {head_dim}: use fa2 or auto")
    return "fa2"


def decode_on_tensor_cores(choice: str) -> bool:
    """EngineConfig.flashinfer_decode's `choice`: auto is tensor cores."""
    return choice != "cuda-cores"


class FlashInferAttentionBackend(AttentionBackend):
    def __init__(self, kv_pool: KVPool, scale: float, num_qo_heads: int, prefill: str = "auto",
                 decode: str = "auto", fused_decode_max_rows: int = 0) -> None:
        import flashinfer

        self._fi = flashinfer
        self.kv_pool = kv_pool
        self.scale = scale
        self.num_qo_heads = num_qo_heads
        _pages, self.page_size, self.num_kv_heads, self.head_dim = kv_pool.k[0].shape
        self.kv_dtype = kv_pool.dtype  # what the pages store
        self.q_dtype = kv_pool.compute_dtype  # q's (and the output's): the model dtype
        self.device = kv_pool.device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # fa3's modules are a JIT build of their own (~1 min, once per cache), as is CUDA-core decode.
        self.prefill_kernel = prefill_kernels(prefill, self.device, self.kv_dtype, self.head_dim)
        self._ragged_ok = self.kv_dtype in SIXTEEN_BIT  # an FP8 pool is always read (above)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                      backend=self.prefill_kernel)
        self.ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD",
                                                                      backend=self.prefill_kernel)
        self.decode_tensor_cores = decode_on_tensor_cores(decode)
        # Graphed decode steps of up to this many rows run kernels/triton_decode.py, where it runs on this pool.
        self.fused_decode_max_rows = (fused_decode_max_rows if triton_decode.supports(
            self.kv_dtype, self.q_dtype, self.head_dim) else 0)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                    use_tensor_cores=self.decode_tensor_cores)
        self._graphs: dict[int, _GraphDecode] = {}
        self._active = self.prefill
        self._out_loc: torch.Tensor | None = None
        self._eager_planned = {id(w): torch.cuda.Event() for w in (self.prefill, self.ragged, self.decode)}
        log.info("FlashInfer attention: %s prefill kernels%s, decode on %s cores%s", self.prefill_kernel,
                 " (ragged when nothing is cached)" if self._ragged_ok else "",
                 "tensor" if self.decode_tensor_cores else "CUDA",
                 f" (Triton's fused decode up to {self.fused_decode_max_rows} rows)" if self.fused_decode_max_rows
                 else "")

    # ---- planning -----------------------------------------------------------------

    def _plan_args(self, m: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Host (CPU) indptr arrays: FlashInfer builds its schedule on the host from them, no sync.
        return (torch.from_numpy(np.ascontiguousarray(m.kv_indptr, dtype=np.int32)),
                m.kv_indices,
                torch.from_numpy(np.ascontiguousarray(m.kv_last_page_len, dtype=np.int32)))

    def plan(self, metadata: AttentionMetadata) -> None:
        m = metadata
        if m.num_decode == m.num_rows:
            wrapper = self.decode
        elif self._ragged_ok and np.array_equal(m.qo_lens, m.kv_lens):  # nothing cached: its own K/V are all
            wrapper = self.ragged
        else:
            wrapper = self.prefill
        self._eager_planned[id(wrapper)].synchronize()
        heads = (self.num_qo_heads, self.num_kv_heads, self.head_dim)
        if wrapper is self.ragged:
            qo_indptr = torch.from_numpy(np.ascontiguousarray(m.qo_indptr, dtype=np.int32))
            wrapper.plan(qo_indptr, qo_indptr, *heads, causal=True, q_data_type=self.q_dtype,
                         kv_data_type=self.q_dtype, sm_scale=self.scale)
        else:
            paged = (*self._plan_args(m), *heads, self.page_size)
            options = dict(q_data_type=self.q_dtype, kv_data_type=self.kv_dtype, sm_scale=self.scale)
            if wrapper is self.decode:
                wrapper.plan(*paged, **options)
            else:
                qo_indptr = torch.from_numpy(np.ascontiguousarray(m.qo_indptr, dtype=np.int32))
                wrapper.plan(qo_indptr, *paged, causal=True, **options)
        self._eager_planned[id(wrapper)].record()
        self._active = wrapper
        self._out_loc = m.out_loc
        self.fused_decode = None

    # ---- CUDA graphs of decode steps ------------------------------------------------

    def init_graphs(self, batch_sizes: list[int], max_pages: int, out_loc: torch.Tensor) -> None:
        """One graph-mode decode wrapper per batch size; `max_pages`: most pages one batch may list; `out_loc`:
        the graphs' fixed buffer of where new K/V go (plan_graph's, its first bs entries for bs rows)."""
        fused_sizes = [bs for bs in batch_sizes if bs <= self.fused_decode_max_rows]
        workspace = triton_decode.Workspace(max(fused_sizes), self.num_kv_heads, self.num_qo_heads // self.num_kv_heads,
                                            self.head_dim, self.device) if fused_sizes else None
        for bs in batch_sizes:
            g = self._graphs[bs] = _GraphDecode(self._fi, self.workspace, bs, max_pages, self.device,
                                                self.decode_tensor_cores)
            if workspace is not None and bs in fused_sizes:
                g.staged = torch.zeros(2 * bs + 1, dtype=torch.int32, pin_memory=True)
                g.fused = triton_decode.FusedDecode(
                    self.kv_pool, self.scale, g.indptr, g.indices, g.last_page_len, out_loc[:bs],
                    workspace, triton_decode.default_splits(bs, self.num_kv_heads, self.device))

    def plan_graph(self, metadata: AttentionMetadata, out_loc: torch.Tensor) -> None:
        """Plans the wrapper of a captured size (`metadata` is already padded to it); K/V go to `out_loc`,
        the graph's own fixed buffer."""
        m = metadata
        bs = m.num_rows
        g = self._graphs[bs]
        if g.planned_once:
            g.planned.synchronize()
        if g.fused is not None and g.staged is not None:  # no FlashInfer plan: the kernel reads the page lists
            assert out_loc.data_ptr() == g.fused.out_loc.data_ptr(), "the graphs' out_loc, as init_graphs bound it"
            staged = g.staged.numpy()
            staged[: bs + 1] = m.kv_indptr
            staged[bs + 1:] = m.kv_last_page_len
            g.indptr.copy_(g.staged[: bs + 1], non_blocking=True)
            g.last_page_len.copy_(g.staged[bs + 1:], non_blocking=True)
            g.indices[: m.kv_indices.numel()].copy_(m.kv_indices, non_blocking=True)
        else:
            kv_indptr, kv_indices, last_page_len = self._plan_args(m)
            g.wrapper.plan(kv_indptr, kv_indices, last_page_len, self.num_qo_heads, self.num_kv_heads,
                           self.head_dim, self.page_size, q_data_type=self.q_dtype, kv_data_type=self.kv_dtype,
                           sm_scale=self.scale)
        g.planned.record()
        g.planned_once = True
        self._active = g.wrapper
        self._out_loc = out_loc
        self.fused_decode = g.fused

    # ---- per layer ------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        assert self._out_loc is not None, "plan() comes first"
        fused.store_kv(self.kv_pool.k[layer_id], self.kv_pool.v[layer_id], self._out_loc, k, v)
        return self.attend(q, k, v, layer_id)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The planned attention, this step's K/V already in the pages (`forward` stores them; the prefill
        graphs store them inside their graphs); into `out` when given."""
        # FlashInfer reads q (and the ragged kernel k and v) through their strides: views into the QKV
        # output need no copy.
        q = q if q.stride(-1) == 1 else q.contiguous()
        if self._active is self.ragged:
            return self.ragged.run(q, k, v, out=out)
        return self._active.run(q, (self.kv_pool.k[layer_id], self.kv_pool.v[layer_id]), out=out)
