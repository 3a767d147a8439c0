"""Tensor parallelism: which shard this rank holds, the ranks' process group, and the collectives.

Layers take a `TensorParallel` and call its collectives; with size 1 they are the
identity and torch.distributed is never touched, so a single-rank engine needs no
process group. With more ranks, `init_tensor_parallel` joins the group (NCCL on
GPUs, gloo on the CPU) before the model is built. The collectives are plain
torch.distributed calls on the default stream with no host sync, so a decode
forward that contains them can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from llmrpc.engine.config import EngineConfig

# How long the ranks wait for each other at rendezvous and in a collective; a peer that died
# mid-collective is usually noticed sooner (gloo sees the closed socket at once).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


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
        """The ranks' `x` (same shape on every rank) concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        # One flat buffer, ranks stacked along dim 0: the form both NCCL and gloo gather into.
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        # torch 2.13 renamed all_gather_into_tensor to all_gather_single; older images lack the new name.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous())
        return torch.cat(out.chunk(self.size), dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank (how sampled tokens stay in lockstep)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.broadcast(x, src)
        return x


def init_tensor_parallel(config: EngineConfig) -> TensorParallel:
    """This rank's TensorParallel, after joining the ranks' process group when there are several.

    Every rank calls this with the same `dist_init_addr`; rank 0 hosts the rendezvous
    there, and the call returns once all `tp_size` ranks have joined.
    """
    tp = TensorParallel(config.tp_rank, config.tp_size)
    if tp.size == 1:
        return tp
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (tp.rank, tp.size):
            raise RuntimeError(f"this process already joined a group as rank {dist.get_rank()} "
                               f"of {dist.get_world_size()}, not {tp.rank} of {tp.size}")
        return tp
    device = torch.device(config.device)
    device_id: torch.device | None = None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        device_id = device  # binds the NCCL communicator to this GPU at once
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{config.dist_init_addr}",
                            rank=tp.rank, world_size=tp.size, timeout=PROCESS_GROUP_TIMEOUT, device_id=device_id)
    return tp
