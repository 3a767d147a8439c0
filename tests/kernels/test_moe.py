"""The MoE kernels on the CPU: routing and experts against transformers' Qwen3-MoE block, the alignment,
and the Triton kernels themselves under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
from __future__ import annotations

from types import ModuleType

import pytest
import torch

from llmrpc.engine.layers.moe import SparseMoeBlock
from llmrpc.kernels import moe


def _hf_block(hidden: int, experts: int, top_k: int, inter: int, renormalize: bool, seed: int):
    import transformers as tf

    config = tf.Qwen3MoeConfig(hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k,
                               moe_intermediate_size=inter, norm_topk_prob=renormalize)
    torch.manual_seed(seed)
    block = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def _ours(hf_block, renormalize: bool) -> SparseMoeBlock:
    e = hf_block.experts
    ours = SparseMoeBlock(e.hidden_dim, e.num_experts, hf_block.gate.top_k, e.intermediate_dim, renormalize)
    with torch.no_grad():
        ours.gate.weight.copy_(hf_block.gate.weight)
        # transformers 5 holds the experts stacked, as we do: the whole-tensor path of our loader.
        ours.experts.weight_loader(ours.experts.gate_up_proj, e.gate_up_proj.data)
        ours.experts.weight_loader(ours.experts.down_proj, e.down_proj.data)
    return ours


@pytest.mark.parametrize("renormalize", [True, False])
def test_block_equals_transformers(renormalize: bool) -> None:
    hf = _hf_block(hidden=24, experts=6, top_k=2, inter=20, renormalize=renormalize, seed=0)
    ours = _ours(hf, renormalize)
    x = torch.randn(1, 37, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hf_weights, hf_ids = hf.gate(x[0])
        weights, ids = ours.gate(x[0])
        assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights)
        torch.testing.assert_close(ours(x[0]), hf(x)[0], atol=1e-5, rtol=1e-5)
    assert len(torch.unique(ids)) == 6  # every expert got tokens


def test_router_ties_fall_as_in_transformers() -> None:
    # Experts 1, 3 and 4 have the same router row, so every token ties among them; with top-2 one
    # of the three is left out, and which one is torch.topk's choice on both sides.
    hf = _hf_block(hidden=16, experts=6, top_k=2, inter=8, renormalize=True, seed=2)
    with torch.no_grad():
        row = torch.full((16,), 0.5)
        for e in (1, 3, 4):
            hf.gate.weight[e] = row
        hf.gate.weight[[0, 2, 5]] = -row  # the others lose for positive inputs
    ours = _ours(hf, True)
    x = torch.rand(9, 16, generator=torch.Generator().manual_seed(3)) + 0.1
    with torch.no_grad():
        _, hf_weights, hf_ids = hf.gate(x)
        weights, ids = ours.gate(x)
    assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights)
    # The tie was real: each token's two experts are two of the three tied ones.
    assert all(len(set(row)) == 2 and set(row) < {1, 3, 4} for row in ids.tolist())
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x[None])[0], atol=1e-6, rtol=1e-6)


def _routing(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return moe.select_experts(torch.randn(tokens, experts, generator=g), top_k, renormalize=False)


def _rows_by_block(a: moe.MoEAlignment) -> list[tuple[int, list[int]]]:
    n = int(a.num_padded)
    return [(int(a.expert_ids[b]), sorted(a.sorted_ids[b * a.block_m:(b + 1) * a.block_m].tolist()))
            for b in range(n // a.block_m)]


def test_torch_alignment_pads_each_expert_to_whole_blocks() -> None:
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs 0..5: experts 2, 0, 2, 1, 0, 2
    a = moe.moe_align_torch(ids, num_experts=4, block_m=2)
    pad = 6
    # expert 0: pairs 1, 4; expert 1: pair 3 (+1 pad); expert 2: pairs 0, 2, 5 (+1 pad); expert 3: none.
    assert a.sorted_ids.tolist()[:8] == [1, 4, 3, pad, 0, 2, 5, pad]
    assert int(a.num_padded) == 8 and a.expert_ids.tolist()[:4] == [0, 1, 2, 2]
    assert len(a.sorted_ids) == moe.max_padded_rows(6, 4, 2) == 10 and a.sorted_ids.tolist()[8:] == [pad, pad]


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 128, 8, 16), (37, 8, 3, 16), (300, 128, 8, 16),
                                                          (200, 6, 2, 64)])
def test_torch_experts_equal_a_dense_reference(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 24, 16
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.3
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.3
    weights, ids = _routing(tokens, experts, top_k, seed=tokens + 1)
    dense = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            dense[t] += weights[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe.fused_moe(x, w13, w2, weights, ids), dense, atol=1e-5, rtol=1e-5)
    a = moe.moe_align_torch(ids, experts, block_m)
    counts = torch.bincount(ids.flatten(), minlength=experts)
    assert int(a.num_padded) == int((-(-counts // block_m) * block_m).sum())
    for expert, rows in _rows_by_block(a):
        real = [r for r in rows if r < tokens * top_k]
        assert real and all(ids.flatten()[r] == expert for r in real)


# ---- the Triton kernels, interpreted on the CPU -----------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    """kernels.moe_triton, its kernels built for Triton's interpreter (numpy on the CPU)."""
    pytest.importorskip("triton")
    import llmrpc.kernels.moe_triton as module

    return module


# 130 x 8 pairs: more than one chunk of the align kernel.
@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 128, 8, 16), (37, 8, 3, 16), (130, 16, 8, 16),
                                                          (200, 6, 2, 64)])
def test_triton_kernels_equal_the_torch_path(interpreted: ModuleType, tokens: int, experts: int, top_k: int,
                                             block_m: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 72, 40  # neither a multiple of the tiles below: the masks matter
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    weights, ids = _routing(tokens, experts, top_k, seed=tokens + 1)
    kernel_alignment = interpreted.moe_align_triton(ids, experts, block_m)
    torch_alignment = moe.moe_align_torch(ids, experts, block_m)
    assert _rows_by_block(kernel_alignment) == _rows_by_block(torch_alignment)
    assert torch.equal(kernel_alignment.sorted_ids[int(torch_alignment.num_padded):],
                       torch_alignment.sorted_ids[int(torch_alignment.num_padded):])
    tiles = interpreted.MoETiles(block_m, interpreted.TileConfig(32, 32, 4, 4, 2),
                                 interpreted.TileConfig(32, 32, 1, 4, 2))
    expected = moe.fused_moe_torch(x, w13, w2, weights, ids)
    for alignment in (kernel_alignment, torch_alignment):
        got = interpreted.fused_moe_triton(x, w13, w2, weights, ids, tiles=tiles, alignment=alignment)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_triton_picks_the_align_kernel_by_size_and_tiles_by_tokens(interpreted: ModuleType) -> None:
    assert [interpreted.moe_tiles(t).block_m for t in (1, 64, 65, 256, 1024, 8192)] == [16, 16, 16, 16, 64, 128]
    # Past the align kernel's limit the sort-based torch alignment feeds the same GEMMs.
    tokens = interpreted.ALIGN_KERNEL_MAX_PAIRS // 2 + 1
    weights, ids = _routing(tokens, 4, 2, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, 32, generator=g)
    w13, w2 = torch.randn(4, 32, 32, generator=g) * 0.2, torch.randn(4, 32, 16, generator=g) * 0.2
    torch.testing.assert_close(interpreted.fused_moe_triton(x, w13, w2, weights, ids),
                               moe.fused_moe_torch(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)
