"""The weight loader: complete checkpoints only, tensor-parallel slices, deterministic dummy weights."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmrpc.engine.config import ModelConfig
from llmrpc.engine.loader import load_model_weights
from llmrpc.engine.models import model_class
from llmrpc.engine.parallel import TensorParallel


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers as tf

    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    tf.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _model(path: Path, tp: TensorParallel = TensorParallel()):
    config = ModelConfig.load(path)
    return model_class(config)(config, tp, 32)


def test_missing_and_unknown_tensors_fail_loudly(tiny_qwen2: Path, tmp_path: Path) -> None:
    weights = load_file(tiny_qwen2 / "model.safetensors")
    (tmp_path / "config.json").write_bytes((tiny_qwen2 / "config.json").read_bytes())
    partial = dict(weights)
    del partial["model.layers.0.self_attn.k_proj.bias"]
    save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 weights, e.g. \['model.layers.0.self_attn.qkv_proj.bias#k'\]"):
        load_model_weights(_model(tmp_path), tmp_path, show_progress=False)
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.0.mlp.extra.weight"):
        load_model_weights(_model(tmp_path), tmp_path, show_progress=False)


def test_tensor_parallel_ranks_load_their_slices(tiny_qwen2: Path) -> None:
    w = load_file(tiny_qwen2 / "model.safetensors")
    head_dim = 8
    for rank in range(2):
        model = _model(tiny_qwen2, TensorParallel(rank, 2))
        load_model_weights(model, tiny_qwen2, show_progress=False)
        layer = model.model.layers[0]
        p = "model.layers.0."
        q_rows = slice(rank * 2 * head_dim, (rank + 1) * 2 * head_dim)  # 2 of 4 query heads
        kv_rows = slice(rank * head_dim, (rank + 1) * head_dim)  # 1 of 2 kv heads
        expected_qkv = torch.cat([w[p + "self_attn.q_proj.weight"][q_rows], w[p + "self_attn.k_proj.weight"][kv_rows],
                                  w[p + "self_attn.v_proj.weight"][kv_rows]])
        assert torch.equal(layer.self_attn.qkv_proj.weight, expected_qkv)
        expected_bias = torch.cat([w[p + "self_attn.q_proj.bias"][q_rows], w[p + "self_attn.k_proj.bias"][kv_rows],
                                   w[p + "self_attn.v_proj.bias"][kv_rows]])
        assert torch.equal(layer.self_attn.qkv_proj.bias, expected_bias)
        assert torch.equal(layer.self_attn.o_proj.weight, w[p + "self_attn.o_proj.weight"][:, q_rows])
        half = slice(rank * 24, (rank + 1) * 24)
        assert torch.equal(layer.mlp.gate_up_proj.weight,
                           torch.cat([w[p + "mlp.gate_proj.weight"][half], w[p + "mlp.up_proj.weight"][half]]))
        assert torch.equal(layer.mlp.down_proj.weight, w[p + "mlp.down_proj.weight"][:, half])
        # 101 vocabulary rows over 2 ranks: 51 each, the last one zero-padded.
        rows = w["model.embed_tokens.weight"][rank * 51:(rank + 1) * 51]
        assert torch.equal(model.model.embed_tokens.weight[: len(rows)], rows)
        assert torch.equal(model.lm_head.weight[: len(rows)], w["lm_head.weight"][rank * 51:(rank + 1) * 51])
        assert rank == 0 or not model.lm_head.weight[50:].any()


def test_kv_heads_replicate_when_fewer_than_ranks(tiny_qwen2: Path) -> None:
    w = load_file(tiny_qwen2 / "model.safetensors")
    k = w["model.layers.0.self_attn.k_proj.weight"]
    for rank, kv_head in [(0, 0), (1, 0), (2, 1), (3, 1)]:  # 4 ranks, 2 kv heads
        model = _model(tiny_qwen2, TensorParallel(rank, 4))
        load_model_weights(model, tiny_qwen2, show_progress=False)
        qkv = model.model.layers[0].self_attn.qkv_proj.weight
        assert torch.equal(qkv[8:16], k[kv_head * 8:(kv_head + 1) * 8])


def test_dummy_weights_are_deterministic_by_seed(tiny_qwen2: Path) -> None:
    def dummy(seed: int) -> dict[str, torch.Tensor]:
        model = _model(tiny_qwen2)
        assert load_model_weights(model, tiny_qwen2, "dummy", seed) == "dummy"
        return dict(model.named_parameters())

    a, b, c = dummy(0), dummy(0), dummy(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.layers.0.self_attn.qkv_proj.weight"], c["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(32))


@pytest.fixture(scope="module")
def tiny_qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer 0 sparse (4 experts of width 24), layer 1 dense; saved by transformers one tensor per expert."""
    import transformers as tf

    path = tmp_path_factory.mktemp("qwen3-moe")
    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=24,
                               num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    tf.Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path


def test_experts_shard_their_intermediate_dimension_over_ranks(tiny_qwen3_moe: Path) -> None:
    w = load_file(tiny_qwen3_moe / "model.safetensors")
    p = "model.layers.0.mlp."
    assert f"{p}experts.3.up_proj.weight" in w  # the checkpoint holds one tensor per expert
    for rank in range(2):
        model = _model(tiny_qwen3_moe, TensorParallel(rank, 2))
        load_model_weights(model, tiny_qwen3_moe, show_progress=False)
        block = model.model.layers[0].mlp
        half = slice(rank * 12, (rank + 1) * 12)  # 24 wide over 2 ranks
        for e in range(4):
            expected = torch.cat([w[f"{p}experts.{e}.gate_proj.weight"][half], w[f"{p}experts.{e}.up_proj.weight"][half]])
            assert torch.equal(block.experts.gate_up_proj[e], expected)
            assert torch.equal(block.experts.down_proj[e], w[f"{p}experts.{e}.down_proj.weight"][:, half])
        assert torch.equal(block.gate.weight, w[f"{p}gate.weight"])  # the router is whole on every rank
        dense = model.model.layers[1].mlp  # mlp_only_layers: an ordinary MLP, split as one
        assert torch.equal(dense.down_proj.weight, w["model.layers.1.mlp.down_proj.weight"][:, rank * 20:(rank + 1) * 20])


def test_stacked_experts_load_like_per_expert_tensors(tiny_qwen3_moe: Path, tmp_path: Path) -> None:
    # transformers 5's in-memory layout: each layer's experts stacked, [gate | up] along dim 1.
    w = load_file(tiny_qwen3_moe / "model.safetensors")
    p = "model.layers.0.mlp.experts."
    stacked = {k: v for k, v in w.items() if not k.startswith(p)}
    stacked[p + "gate_up_proj"] = torch.stack([torch.cat([w[f"{p}{e}.gate_proj.weight"], w[f"{p}{e}.up_proj.weight"]])
                                               for e in range(4)])
    stacked[p + "down_proj"] = torch.stack([w[f"{p}{e}.down_proj.weight"] for e in range(4)])
    save_file(stacked, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((tiny_qwen3_moe / "config.json").read_bytes())
    for rank in range(2):
        a, b = _model(tiny_qwen3_moe, TensorParallel(rank, 2)), _model(tmp_path, TensorParallel(rank, 2))
        load_model_weights(a, tiny_qwen3_moe, show_progress=False)
        load_model_weights(b, tmp_path, show_progress=False)
        for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(x, y), name


def test_a_missing_expert_tensor_fails_loudly(tiny_qwen3_moe: Path, tmp_path: Path) -> None:
    weights = load_file(tiny_qwen3_moe / "model.safetensors")
    del weights["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((tiny_qwen3_moe / "config.json").read_bytes())
    with pytest.raises(ValueError, match=re.escape("lacks 1 weights, e.g. "
                                                   "['model.layers.0.mlp.experts.gate_up_proj#(3, 1)']")):
        load_model_weights(_model(tmp_path), tmp_path, show_progress=False)
