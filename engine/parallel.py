"""Tensor parallelism: which shard this rank holds, and the collectives between ranks.

Layers take a `TensorParallel` and call its collectives; with size 1 they are the
identity and torch.distributed is never touched, so a single-rank engine needs no
process group. Setting up the group (NCCL on GPUs, gloo on the CPU) belongs to the
process that starts the ranks; it must be initialized before a model with size > 1
runs its first forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def shard(self, total: int, what: str = "dimension") -> int:
        """The size of this rank's equal slice of `total`."""
        if total % self.size:
            raise ValueError(f"{what} {total} does not split over {self.size} tensor-parallel ranks")
        return total // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks (in place when there is more than one)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank (how sampled tokens stay in lockstep)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.broadcast(x, src)
        return x
