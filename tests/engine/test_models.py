"""Our Llama, Qwen2, Qwen3, Mistral and Qwen3-MoE against transformers, through the runner's real step path.

Tiny random-weight models are saved with save_pretrained, loaded by our
safetensors loader, and driven step by step like the scheduler would: several
requests of different lengths in one batch, prompts prefilled in chunks while
others decode, a request reusing another's cached prefix pages, pages handed
out in shuffled order. Every new token's logits must match transformers run over
the whole sequence so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrpc.engine.config import EngineConfig, ModelConfig
from llmrpc.engine.runner import ModelRunner
from llmrpc.engine.step import SlotParams, Step
from llmrpc.kernels import fused, triton_decode, triton_gemv

PAGE = 4
CHUNK = 5  # prefill tokens per request per step
DECODE_STEPS = 16
ATOL = 1e-4


def _tiny_hf_model(kind: str, path: Path):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    if kind == "llama":
        # llama3 RoPE scaling with a short original context, so the scaled frequencies matter.
        config = tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=5000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = tf.LlamaForCausalLM(config)
    elif kind == "llama-biases":
        # attention_bias puts biases on q, k, v and o; mlp_bias on gate, up and down.
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True,
                                                   tie_word_embeddings=False))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=10000.0))
    elif kind == "mistral":
        # Mistral-7B-v0.3's layout: no biases, no sliding window (MistralConfig's default has one).
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None, rope_theta=1e6,
                                                       tie_word_embeddings=False))
    elif kind == "qwen3_moe":
        # 3 layers: layer 0 dense (mlp_only_layers), 1 and 2 sparse; 8 experts, 3 per token, renormalized.
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=32, moe_intermediate_size=40, num_experts=8,
            num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
            tie_word_embeddings=False))
    else:
        # head_dim 32 is not hidden/heads: the explicit head_dim must be honoured.
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False))
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        # Everything random, biases and norm weights included, so a misplaced tensor shows.
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    model = model.float().eval()
    # Sharded, with an index, so the loader walks several files.
    model.save_pretrained(path, max_shard_size="200KB")
    return model


@dataclass
class Request:
    slot: int
    prompt: list[int]
    admit_at: int
    prefix: tuple[int, list[int]] | None = None  # (cached tokens, their pages) borrowed at admission
    pages: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # pages the worker has not been told about yet
    done: int = 0  # prompt tokens with KV
    generated: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


def _drive(runner: ModelRunner, hf_model, requests: list[Request], seed: int) -> int:
    """Runs the requests to completion, comparing every step's logits; returns the number of steps."""
    rng = np.random.default_rng(seed)
    borrowed = {p for r in requests if r.prefix for p in r.prefix[1]}
    free = [int(p) for p in rng.permutation(runner.kv_pool.num_pages) if p not in borrowed]
    admitted: set[int] = set()
    step_id = 0
    while any(len(r.generated) < DECODE_STEPS + 1 for r in requests):
        admissions, decode, prefill = [], [], []
        for r in requests:
            if step_id < r.admit_at or len(r.generated) > DECODE_STEPS:
                continue
            if r.slot not in admitted:
                admitted.add(r.slot)
                admissions.append(SlotParams(r.slot, temperature=0.0))
                if r.prefix is not None:  # the cached pages join the new slot's table in this step
                    r.done, r.pages, r.unsent = r.prefix[0], list(r.prefix[1]), list(r.prefix[1])
            (decode if r.done == len(r.prompt) else prefill).append(r)
        rows = decode + prefill
        starts, lens, new_pages = [], [], []
        for r in rows:
            start = len(r.tokens) - 1 if r in decode else r.done
            n = 1 if r in decode else min(CHUNK, len(r.prompt) - r.done)
            need = -(-(start + n) // PAGE) - len(r.pages)
            grabbed = [int(free.pop()) for _ in range(need)]
            r.pages += grabbed
            starts.append(start)
            lens.append(n)
            new_pages.append(r.unsent + grabbed)
            r.unsent = []
        chunk_tokens = [t for r, s, n in zip(rows, starts, lens) if r in prefill for t in r.prompt[s:s + n]]
        sample_chunks = [r.done + n == len(r.prompt) for r, n in zip(prefill, lens[len(decode):])]
        step = Step(
            step_id, len(decode),
            slots=np.array([r.slot for r in rows], np.int32),
            starts=np.array(starts, np.int32),
            chunk_lens=np.array(lens[len(decode):], np.int32),
            chunk_tokens=np.array(chunk_tokens, np.int32),
            sample_chunks=np.array(sample_chunks, bool),
            page_counts=np.array([len(p) for p in new_pages], np.int32),
            page_ids=np.array([p for ps in new_pages for p in ps], np.int32),
            admissions=admissions,
        )
        with torch.inference_mode():
            batch = runner.prepare(step)
            hidden = runner.model(batch.input_ids, batch.positions, runner.attention)
            logits = runner.model.compute_logits(hidden)
            offset = 0
            for r, s, n in zip(rows, starts, lens):
                reference = hf_model(torch.tensor([r.tokens[: s + n]])).logits[0, s: s + n]
                torch.testing.assert_close(logits[offset: offset + n], reference, atol=ATOL, rtol=0)
                offset += n
            out = runner.sample(batch, logits[batch.sample_indices])
        sampled = [r for r in decode] + [r for r, f in zip(prefill, sample_chunks) if f]
        assert len(out.tokens) == len(sampled) == step.num_sampled
        for r, token in zip(sampled, out.tokens.tolist()):
            r.generated.append(token)
        for r, n in zip(prefill, lens[len(decode):]):
            r.done += n
        step_id += 1
    return step_id


def _plan_fused_decodes(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Makes every pure decode step's plan choose the fused kernel, as FlashInferAttentionBackend.plan_graph
    does; returns the list the rows of each such step are appended to."""
    attention, pool = runner.attention, runner.kv_pool
    heads = runner.model_config.num_attention_heads
    workspace = triton_decode.Workspace(8, pool.k[0].shape[2], heads // pool.k[0].shape[2], pool.k[0].shape[3],
                                        pool.device)
    plan, fused_steps = attention.plan, []

    def plan_fused(m) -> None:
        plan(m)
        attention.fused_decode = None
        if m.num_decode == m.num_rows:
            fused_steps.append(m.num_rows)
            attention.fused_decode = triton_decode.FusedDecode(
                pool, attention.scale, torch.from_numpy(m.kv_indptr), m.kv_indices,
                torch.from_numpy(m.kv_last_page_len), m.out_loc, workspace, splits=3)

    monkeypatch.setattr(attention, "plan", plan_fused)
    return fused_steps


ARCHITECTURES = {"llama": "LlamaForCausalLM", "llama-biases": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize(("kind", "kernels"), [*((kind, "torch") for kind in ARCHITECTURES),
                                               ("llama-biases", "gemv"), ("qwen3", "gemv"), ("qwen3_moe", "gemv"),
                                               ("qwen3", "fused-decode"), ("qwen3_moe", "fused-decode")])
def test_logits_match_transformers_in_mixed_batches(kind: str, kernels: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels "gemv": every step of up to 16 rows runs its linears through kernels/triton_gemv.py (under the
    interpreter, tests/conftest.py's switch; on a GPU that is CUDA steps of up to --gemv-max-rows).
    "fused-decode": every pure decode step's attention runs kernels/triton_decode.py over the step's pages, as
    FlashInfer's decode graphs of up to --fused-decode-max-rows rows do on a GPU."""
    if kernels != "torch":
        pytest.importorskip("triton")
    if kernels == "gemv":
        monkeypatch.setattr(fused, "_gemv", lambda x, weight, kernel: x.shape[0] <= triton_gemv.MAX_ROWS)
    hf_model = _tiny_hf_model(kind, tmp_path)
    runner = ModelRunner(EngineConfig(model_path=str(tmp_path), page_size=PAGE, max_total_tokens=PAGE * 64,
                                      max_slots=8, max_context=128))
    fused_steps = _plan_fused_decodes(runner, monkeypatch) if kernels == "fused-decode" else []
    expected_arch = ARCHITECTURES[kind]
    assert runner.info.architecture == expected_arch
    assert runner.info.num_pages == 64 and runner.info.context_length == 128
    rng = np.random.default_rng(7)
    p0, p1, p2 = (rng.integers(0, 256, size=n).tolist() for n in (11, 3, 23))
    a = Request(slot=5, prompt=p0, admit_at=0)
    requests = [
        a,
        Request(slot=0, prompt=p1, admit_at=0),
        Request(slot=2, prompt=p2, admit_at=3),  # prefills in 5 chunks while the others decode
    ]
    steps = _drive(runner, hf_model, requests, seed=1)
    # A fourth request shares a's first two pages (8 cached tokens) and continues from there,
    # into a slot that a finished request used before.
    shared = Request(slot=0, prompt=p0[:8] + rng.integers(0, 256, size=6).tolist(), admit_at=0,
                     prefix=(8, a.pages[:2]))
    _drive(runner, hf_model, [shared], seed=2)
    assert steps > DECODE_STEPS
    assert all(len(r.generated) == DECODE_STEPS + 1 for r in requests + [shared])
    if kernels == "fused-decode":  # decode steps of 3 rows and of 1 took it
        assert 3 in fused_steps and 1 in fused_steps


def test_model_config_reads_transformers_configs(tmp_path: Path) -> None:
    _tiny_hf_model("llama", tmp_path)
    config = ModelConfig.load(tmp_path)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (64, 4, 2, 16)
    assert config.rope_theta == 5000.0 and config.tie_word_embeddings and not config.attention_bias
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    # transformers 4 layout: rope_theta and rope_scaling at the top level.
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1e6, "eos_token_id": 3}
    v4 = ModelConfig.from_hf(qwen2, {"eos_token_id": [4, 3]})
    assert v4.rope_theta == 1e6 and v4.rope_scaling is None and v4.attention_bias
    assert v4.num_key_value_heads == 2 and v4.head_dim == 4 and v4.eos_token_ids == (4, 3)
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_hf({**qwen2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
