"""ModelRunner: what one worker rank runs — load the model, hold the KV pool, execute Steps.

`execute(step)` is three phases, also callable one by one:
`prepare` (admissions reset their slots, new pages join the page tables, the step
becomes a ForwardBatch and the attention backend is planned), `forward` (the
model over the flat batch, logits at each sampling row's last token) and `sample`
(tokens drawn per row, stored on the device as each slot's next decode input,
copied to the host for the reply).

`launch(step)` does all three without waiting for the GPU: the tokens come back
through a non-blocking device → host copy and an event, so the caller can
launch step N+1 before step N's tokens are read (`PendingOutput.result()`), and
the GPU never idles while Python prepares the next step. A multi-step decode
(`Step.decode_steps` = k) queues k such passes back to back and copies their
k × B tokens to the host once. On CUDA, when the backend supports them, pure
decode steps replay CUDA graphs and prefill steps of up to `prefill_graph_max_tokens`
tokens replay piecewise ones, attention eager between them (engine/cuda_graph.py).

Constrained rows (engine/constraint.py): admissions give their slots a grammar
matcher (the grammar compiled once, ahead of time, by `compile_constraint`), the
sample phase masks those rows' logits, and their tokens reach the matchers before
the next step's mask is filled. Steps run in order, so this holds at any overlap
depth; the one wait it adds, for step N's constrained tokens on the host, comes
after step N+1's forward is queued. With tensor parallelism only rank 0 keeps
matchers (and loads the tokenizer): rank 0's draw is every rank's.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, cast

import numpy as np
import torch

from llmrpc.engine.config import EngineConfig, ModelConfig
from llmrpc.engine.constraint import Constraint, ConstraintError, ConstraintTable, GrammarCache
from llmrpc.engine.forward_batch import ForwardBatch, check_kv_room
from llmrpc.engine.kv_cache import KVPool, kv_cache_dtype, plan_num_pages
from llmrpc.engine.loader import load_model_weights
from llmrpc.engine.models import model_class
from llmrpc.engine.parallel import init_tensor_parallel
from llmrpc.engine.sampling import Sampler
from llmrpc.engine.step import Step, StepOutput
from llmrpc.kernels import AttentionMetadata, create_attention_backend, fused, resolve_attention_backend

if TYPE_CHECKING:
    import xgrammar as xgr

    from llmrpc.engine.cuda_graph import DecodeGraphs, PrefillGraphs
    from llmrpc.engine.models.llama import LlamaAttention
    from llmrpc.kernels.flashinfer_backend import FlashInferAttentionBackend

log = logging.getLogger("llmrpc.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineInfo:
    """What a worker reports about itself (GetInfo)."""

    model_name: str
    architecture: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_pages: int
    page_size: int
    max_slots: int
    device: str
    dtype: str
    model_path: str
    tp_rank: int
    tp_size: int
    attention_backend: str = "torch"
    kv_cache_dtype: str = ""  # the dtype the KV pages are stored in (--kv-cache-dtype)


class PendingOutput:
    """A launched step whose tokens are on their way to pinned host memory."""

    def __init__(self, step_id: int, host: dict[str, torch.Tensor], ready: torch.cuda.Event | None) -> None:
        self.step_id = step_id
        self._host = host
        self._ready = ready

    def done(self) -> bool:
        return self._ready is None or self._ready.query()

    def result(self) -> StepOutput:
        """Waits for the copy (the GIL is released meanwhile) and returns the step's output."""
        if self._ready is not None:
            self._ready.synchronize()
        h = {name: t.numpy().copy() for name, t in self._host.items()}
        out = StepOutput(self.step_id, h.get("tokens", np.zeros(0, dtype=np.int32)))
        out.logprobs, out.top_ids, out.top_logprobs = h.get("logprobs"), h.get("top_ids"), h.get("top_logprobs")
        return out


class _Phases:
    """Start-up progress: one log line per phase with its time (device work included)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.last = time.perf_counter()

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    def done(self, message: str, *args: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        log.info(message + " (%.1f s)", *args, now - self.last)
        self.last = now


@contextlib.contextmanager
def _default_tensor_placement(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created directly on `device` in `dtype` (no CPU copy of a big model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.torch_dtype_name]
        self.model_config = ModelConfig.load(config.model_path)
        mc = self.model_config
        self.max_context = config.max_context or mc.max_position_embeddings
        self.tp = init_tensor_parallel(config)  # joins the ranks' process group before any collective
        fused.GEMV_MAX_ROWS = config.gemv_max_rows  # the linears' kernel at a few rows, read as the graphs capture
        phase = _Phases(self.device)
        with _default_tensor_placement(self.device, self.dtype):
            self.model = model_class(mc)(mc, self.tp, self.max_context)
        self.model.eval()
        fmt = load_model_weights(self.model, config.model_path, config.load_format, config.seed,
                                 show_progress=config.tp_rank == 0)
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        phase.done("weights: %s, %.2f GiB on %s", fmt, weight_bytes / 2**30, self.device)
        attn0 = cast("LlamaAttention", self.model.model.layers[0].self_attn)
        kv_dtype = kv_cache_dtype(config)
        bytes_per_token = KVPool.bytes_per_token(mc.num_hidden_layers, attn0.num_kv_heads, mc.head_dim, kv_dtype)
        backend = resolve_attention_backend(config.attention_backend, config.device)
        use_graphs = config.is_cuda and config.cuda_graph_max_bs > 0 and backend == "flashinfer"
        num_pages = plan_num_pages(config, bytes_per_token)
        # On a GPU one extra page, never reported to the scheduler, takes the K/V of the start-up
        # warm-up and of padded graph rows.
        self.kv_pool = KVPool(mc.num_hidden_layers, num_pages + int(config.is_cuda), config.page_size,
                              attn0.num_kv_heads, mc.head_dim, config.max_slots, self.max_context,
                              kv_dtype, self.device, compute_dtype=self.dtype)
        options = ({"prefill": config.flashinfer_prefill, "decode": config.flashinfer_decode,
                    "fused_decode_max_rows": config.fused_decode_max_rows} if backend == "flashinfer" else {})
        self.attention = create_attention_backend(backend, config.device, kv_pool=self.kv_pool,
                                                  scale=mc.head_dim ** -0.5, num_qo_heads=attn0.num_heads, **options)
        self.sampler = Sampler(config.max_slots, mc.vocab_size, self.device, config.seed)
        self.constraints = ConstraintTable(config.max_slots, mc.vocab_size, self.device)
        self._tokenizer: Any = None
        self._grammars: GrammarCache | ConstraintError | None = None  # built on first use; or why it cannot be
        self._grammars_lock = threading.RLock()  # the tokenizer's and the grammar cache's first loads
        # Each slot's last sampled token: the input of its next decode row, never leaving the device.
        self.last_tokens = torch.zeros(config.max_slots, dtype=torch.long, device=self.device)
        phase.done("KV pool: %d pages of %d tokens (%d tokens, %s), %.2f GiB", num_pages, config.page_size,
                   num_pages * config.page_size, config.kv_cache_dtype_name,
                   num_pages * config.page_size * bytes_per_token / 2**30)
        if config.is_cuda:
            prefills = self._warm_up(scratch_page=num_pages)
            phase.done("kernels: FlashInfer modules loaded, Triton kernels compiled (%d %s prefills)", prefills, backend)
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            from llmrpc.engine.cuda_graph import DecodeGraphs

            # use_graphs: the backend is FlashInfer's, the one with graph buffers.
            self.graphs = DecodeGraphs(self.model, cast("FlashInferAttentionBackend", self.attention), self.kv_pool,
                                       scratch_page=num_pages,
                                       max_bs=min(config.cuda_graph_max_bs, config.max_slots))
            phase.done("graph capture: decode batch sizes %s", ",".join(map(str, self.graphs.sizes)))
        self.prefill_graphs: PrefillGraphs | None = None
        if use_graphs and config.prefill_graph_max_tokens > 0:
            from llmrpc.engine.cuda_graph import PrefillGraphs

            try:
                self.prefill_graphs = PrefillGraphs(self.model, cast("FlashInferAttentionBackend", self.attention),
                                                    config.prefill_graph_max_tokens, num_pages, self.device)
                phase.done("graph capture: prefill steps of up to %s tokens",
                           ",".join(map(str, self.prefill_graphs.sizes)))
            except RuntimeError as exc:  # a layer that cannot be captured (a host sync): prefills stay eager
                torch.cuda.synchronize(self.device)
                log.warning("prefill graphs off, prefills run eagerly: their capture failed (%s)", exc)
        self.info = EngineInfo(
            model_name=mc.name, architecture=mc.architecture, context_length=self.max_context,
            vocab_size=mc.vocab_size, eos_token_ids=mc.eos_token_ids, num_pages=num_pages,
            page_size=config.page_size, max_slots=config.max_slots, device=str(self.device),
            dtype=config.torch_dtype_name, model_path=config.model_path, tp_rank=config.tp_rank,
            tp_size=config.tp_size, attention_backend=backend, kv_cache_dtype=config.kv_cache_dtype_name,
        )
        log.info("loaded %s (%s, %s weights) on %s: %d KV pages of %d tokens (%s), in %.1f s", mc.name,
                 mc.architecture, fmt, self.device, num_pages, config.page_size, config.kv_cache_dtype_name,
                 phase.total)

    @torch.inference_mode()
    def _warm_up(self, scratch_page: int) -> int:
        """Two eager prefills of a few tokens into the scratch page, the second after the first's tokens
        (a cached prefix: a backend may run other kernels for it; with one-token pages only the first
        fits), then one draw of each sampler: every kernel module loads (FlashInfer builds what its JIT
        cache lacks) and every Triton kernel compiles before the worker reports ready, not inside the first
        request. Returns how many prefills ran."""
        ps, device = self.config.page_size, self.device
        n = max(min(ps, 8) // 2, 1)
        cached_lens = (0, n) if 2 * n <= ps else (0,)
        for cached in cached_lens:
            meta = AttentionMetadata(
                page_size=ps, num_decode=0, qo_lens=np.array([n], np.int32), kv_lens=np.array([cached + n], np.int32),
                qo_indptr=np.array([0, n], np.int32), kv_indptr=np.array([0, 1], np.int32),
                kv_last_page_len=np.array([cached + n], np.int32),
                kv_indices=torch.tensor([scratch_page], dtype=torch.int32, device=device),
                out_loc=scratch_page * ps + torch.arange(cached, cached + n, device=device),
                positions=torch.arange(cached, cached + n, device=device))
            self.attention.plan(meta)
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=device), meta.positions, self.attention)
        logits = self.model.compute_logits(hidden[-1:])
        self.sampler.warm_up(logits)
        if self.config.tp_rank == 0:
            self.constraints.warm_up(logits)
        torch.cuda.synchronize(device)
        return len(cached_lens)

    # ---- constrained decoding ---------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer, loaded on first use (constraints, text prompts)."""
        with self._grammars_lock:
            if self._tokenizer is None:
                from llmrpc.engine.hub import load_tokenizer

                self._tokenizer = load_tokenizer(self.config.model_path)
            return self._tokenizer

    def grammars(self) -> GrammarCache:
        """The grammar cache over the model's tokenizer (built on first use); ConstraintError when the
        model has no tokenizer (e.g. random weights at a config's shape)."""
        with self._grammars_lock:
            if self._grammars is None:
                try:
                    self._grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size,
                                                  self.model_config.eos_token_ids)
                except ConstraintError as exc:
                    self._grammars = exc
                except Exception as exc:  # no tokenizer files, or ones transformers cannot read
                    log.info("constraints refused: no tokenizer at %s (%s)", self.config.model_path, exc)
                    self._grammars = ConstraintError(
                        "constraint", "the model has no tokenizer, which constrained decoding needs")
            cached = self._grammars
        if isinstance(cached, ConstraintError):
            raise cached
        return cached

    def compile_constraint(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """Compiles (or finds) `constraint`'s grammar; thread-safe, so callers compile off the step thread.
        Raises ConstraintError naming the field when it cannot be served."""
        return self.grammars().get(constraint)

    @torch.inference_mode()
    def execute(self, step: Step) -> StepOutput:
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: Step) -> PendingOutput:
        """Queues the step's whole GPU work and returns without waiting for it."""
        if step.decode_steps > 1:
            return self._launch_passes(step)
        batch = self.prepare(step)
        if batch is None:
            return PendingOutput(step.step_id, {}, None)
        return self.sample_async(batch, self.forward(batch))

    def _launch_passes(self, step: Step) -> PendingOutput:
        """Multi-step decode: k passes queued back to back, each feeding the tokens the one before
        sampled (they never leave the device), and one copy of all k × B tokens to the host."""
        if step.num_prefill:
            raise ValueError(f"step {step.step_id}: {step.decode_steps} decode steps need every row to decode, "
                             f"{step.num_prefill} of {step.num_rows} rows prefill")
        drawn: list[dict[str, torch.Tensor]] = []
        for i in range(step.decode_steps):
            batch = self.prepare(step.decode_pass(i))
            if batch is None:
                return PendingOutput(step.step_id, {}, None)
            if i == 0:  # the pages for every pass came with the first: refuse a block that would run short
                check_kv_room(step.step_id, self.kv_pool, step.slots.astype(np.int64),
                              step.starts.astype(np.int64) + step.decode_steps)
            drawn.append(self._draw(batch, self.forward(batch)))
        return self._to_host(step.step_id, {name: torch.cat([d[name] for d in drawn]) for name in drawn[0]})

    @torch.inference_mode()
    def prepare(self, step: Step) -> ForwardBatch | None:
        """Applies the step's admissions and pages; None when the step has no rows to run."""
        for params in step.admissions:
            self.kv_pool.reset_slot(params.slot)
            self.sampler.admit(params)
            if self.config.tp_rank == 0:  # the other ranks' draws are replaced by rank 0's
                grammar = None if params.constraint is None else self.compile_constraint(params.constraint)
                self.constraints.admit(params.slot, grammar, params.output_tokens)
        self.kv_pool.append_pages(step.slots.astype(np.int64), step.page_counts, step.page_ids)
        if step.num_rows == 0:
            return None
        batch = ForwardBatch.build(step, self.kv_pool, self.last_tokens, self.max_context)
        if self.graphs is not None and self.graphs.can_run(batch):
            batch.graph_size = self.graphs.plan(batch)
        else:
            self.attention.plan(batch.attention)
        return batch

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [S, vocab] at the last token of each row that samples."""
        if batch.graph_size and self.graphs is not None:
            return self.graphs.replay(batch.graph_size, batch.attention.num_rows)
        if self.prefill_graphs is not None and (size := self.prefill_graphs.size_for(batch)):
            hidden = self.prefill_graphs.replay(batch, size)
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.attention)
        return self.model.compute_logits(hidden[batch.sample_indices])

    def sample(self, batch: ForwardBatch, logits: torch.Tensor) -> StepOutput:
        return self.sample_async(batch, logits).result()

    @torch.inference_mode()
    def sample_async(self, batch: ForwardBatch, logits: torch.Tensor) -> PendingOutput:
        """Samples and starts copying the tokens to the host; they stay on the device for the next step."""
        if len(batch.sample_slots) == 0:
            return PendingOutput(batch.step_id, {}, None)
        return self._to_host(batch.step_id, self._draw(batch, logits))

    def _draw(self, batch: ForwardBatch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's tokens (and logprobs) on the device, each slot's token kept as its next input."""
        slots = batch.sample_slots
        # The forward is queued: the host waits for the last step's constrained tokens (if any) and
        # fills this step's bitmask while the device computes.
        constrain = self.constraints.mask(slots)
        result = self.sampler.sample(logits, slots, batch.sample_positions, constrain)
        # Ranks must agree on the tokens: rank 0's draw is everyone's.
        tokens = self.tp.broadcast(result.tokens)
        self.constraints.sampled(slots, tokens)
        self.last_tokens[torch.from_numpy(slots).to(self.device, non_blocking=True)] = tokens
        device = {"tokens": tokens.to(torch.int32)}
        if result.logprobs is not None:
            device["logprobs"] = result.logprobs
            if result.top_ids is not None and result.top_logprobs is not None:
                device["top_ids"] = result.top_ids.to(torch.int32)
                device["top_logprobs"] = result.top_logprobs
        return device

    def _to_host(self, step_id: int, device: dict[str, torch.Tensor]) -> PendingOutput:
        """Starts the device → pinned host copy of a step's outputs; the event tells when it is done."""
        if not self.config.is_cuda:
            return PendingOutput(step_id, {k: v.cpu() for k, v in device.items()}, None)
        host = {}
        for name, t in device.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name].copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingOutput(step_id, host, ready)
