"""The sparse MLP of a mixture-of-experts layer: a replicated router and the experts' fused weights.

Experts are held as two stacked parameters per layer (transformers 5's own
layout): `gate_up_proj` [E_local, 2 * I / tp, H] ([gate | up] rows) and
`down_proj` [E_local, H, I / tp]. Tensor parallelism shards every expert's
intermediate dimension, so each rank holds all experts, computes a partial sum
for every token and one all-reduce finishes the layer, as in a dense MLP.

The weight loader takes either layout of a checkpoint: one tensor per expert and
projection (`experts.7.up_proj.weight`, shard id (7, 1)) or the stacked tensors
whole (shard id None). It addresses experts by global id through `local_experts`,
so expert parallelism can later give each rank a range of experts without
touching the checkpoint path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmrpc.engine.layers.linear import default_weight_loader
from llmrpc.engine.layers.norm import RMSNorm
from llmrpc.engine.parallel import TensorParallel
from llmrpc.kernels import moe

# Expert shard ids: (global expert id, part) for one expert's tensor, None for the stacked whole.
ExpertShard = tuple[int, int] | None
GATE, UP, DOWN = 0, 1, 0  # parts: gate_up_proj holds gate (0) then up (1); down_proj has one


class TopKRouter(nn.Module):
    """Router logits x W^T [T, E] → each token's top-k experts and their weights (replicated on every rank)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 weights [T, top_k], int64 expert ids [T, top_k])."""
        return moe.select_experts(F.linear(x, self.weight), self.top_k, self.renormalize)


class FusedMoE(nn.Module):
    """The experts of one layer, run together by kernels/moe.py over the tokens routed to each."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp: TensorParallel = TensorParallel(), local_experts: range | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.local_experts = range(num_experts) if local_experts is None else local_experts
        if self.local_experts != range(num_experts):
            raise NotImplementedError("expert parallelism: every rank holds all experts for now")
        self.intermediate_size = tp.shard(intermediate_size, "moe_intermediate_size")
        local, inter = len(self.local_experts), self.intermediate_size
        self.gate_up_proj = self._parameter(local, 2 * inter, hidden_size, parts=(GATE, UP))
        self.down_proj = self._parameter(local, hidden_size, inter, parts=(DOWN,))

    def _parameter(self, *shape: int, parts: tuple[int, ...]) -> nn.Parameter:
        param = nn.Parameter(torch.empty(*shape), requires_grad=False)
        param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # What a complete checkpoint fills, one tensor per expert and part (the loader checks it).
        param.shard_ids = [(e, part) for e in self.local_experts for part in parts]  # type: ignore[attr-defined]
        return param

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ExpertShard = None) -> None:
        inter, rank = self.intermediate_size, self.tp.rank
        is_down = param is self.down_proj
        if shard_id is None:  # the stacked tensor of every expert: [E, 2I, H] or [E, H, I]
            experts = loaded_weight[self.local_experts.start:self.local_experts.stop]
            if is_down:
                default_weight_loader(param, experts.narrow(2, rank * inter, inter))
            else:
                full = experts.shape[1] // 2
                for part in (GATE, UP):
                    default_weight_loader(param.narrow(1, part * inter, inter),
                                          experts.narrow(1, part * full + rank * inter, inter))
            return
        expert, part = shard_id
        if expert not in self.local_experts:
            return  # another rank's expert
        local = param[expert - self.local_experts.start]
        if is_down:  # [H, I]: this rank's columns
            default_weight_loader(local, loaded_weight.narrow(1, rank * inter, inter))
        else:  # gate or up [I, H]: this rank's rows, into its half
            default_weight_loader(local.narrow(0, part * inter, inter), loaded_weight.narrow(0, rank * inter, inter))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(moe.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids))


class SparseMoeBlock(nn.Module):
    """A MoE layer's MLP: `gate` (the router) and `experts`, named as in HF checkpoints."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor,
                       norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual): the router and the experts read the same normed input."""
        x, residual = norm(x, residual)
        return self(x), residual
