"""Linear layers split over tensor-parallel ranks (Megatron style).

Column-parallel layers split their output features, so each rank computes a slice
of the activations; row-parallel layers split their input features and sum the
partial results over ranks. An attention block is QKV (column) → attention on the
local heads → O (row); an MLP is gate_up (column) → act → down (row): one
all-reduce per block.

Each layer also runs with the op before it folded in (`forward_normed`: the RMSNorm
before QKV or gate_up; `forward_silu_mul`: the activation before down): at a few rows
on CUDA that is one GEMV launch instead of two kernels (kernels/fused.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from llmrpc.engine.parallel import TensorParallel
from llmrpc.kernels import fused

if TYPE_CHECKING:
    from llmrpc.engine.layers.norm import RMSNorm


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """A replicated parameter: the checkpoint tensor as is."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"weight shape {tuple(loaded_weight.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


def _parameter(*shape: int, loader: Callable[..., None]) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]  # engine/loader.py calls it
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split evenly over the ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size = tp.shard(output_size, "output features")
        self.weight = _parameter(self.output_size, input_size, loader=self.weight_loader)
        self.bias = _parameter(self.output_size, loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        size = param.shape[0]
        default_weight_loader(param, loaded_weight.narrow(0, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.linear(x, self.weight, self.bias)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None,
                       norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual), or (self(norm(x)), x) without a residual."""
        return fused.norm_linear(x, residual, norm.weight, norm.eps, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears over the same input run as one matmul (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp: TensorParallel = TensorParallel()) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(  # type: ignore[override]  # the loader passes merged layers a shard id
            self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        default_weight_loader(param.narrow(0, offset, size), loaded_weight.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections as one matmul, split by heads.

    With fewer KV heads than ranks, each KV head is replicated on the ranks whose
    query heads attend to it (GQA groups stay on one rank).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TensorParallel = TensorParallel()) -> None:
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = tp.shard(num_kv_heads, "key-value heads")
            self.kv_head_offset = tp.rank * self.num_kv_heads
        elif tp.size % num_kv_heads == 0:
            self.num_kv_heads = 1
            self.kv_head_offset = tp.rank // (tp.size // num_kv_heads)
        else:
            raise ValueError(f"{num_kv_heads} key-value heads do not spread over {tp.size} ranks")
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        nn.Module.__init__(self)
        self.tp = tp
        self.input_size = hidden_size
        self.output_size = self.q_size + 2 * self.kv_size
        self.weight = _parameter(self.output_size, hidden_size, loader=self.weight_loader)
        self.bias = _parameter(self.output_size, loader=self.weight_loader) if bias else None

    def weight_loader(  # type: ignore[override]  # the loader passes merged layers a shard id
            self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp.rank * self.q_size
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, start = self.kv_size, self.kv_head_offset * self.head_dim
        else:
            raise ValueError(f"unknown QKV shard {shard_id!r}")
        default_weight_loader(param.narrow(0, offset, size), loaded_weight.narrow(0, start, size))


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, + b: W's input columns split over the ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = tp.shard(input_size, "input features")
        self.output_size = output_size
        self.weight = _parameter(output_size, self.input_size, loader=self.weight_loader)
        # The bias is whole on every rank and added once, after the sum.
        self.bias = _parameter(output_size, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        size = param.shape[1]
        default_weight_loader(param, loaded_weight.narrow(1, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduced(fused.linear(x, self.weight))

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) of x = [gate | up] (this rank's halves of the merged gate_up output)."""
        return self._reduced(fused.silu_mul_linear(x, self.weight))

    def _reduced(self, partial: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(partial)
        return y if self.bias is None else y + self.bias
