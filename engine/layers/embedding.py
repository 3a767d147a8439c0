"""Token embedding and LM head split over tensor-parallel ranks by vocabulary rows.

Each rank holds ceil(vocab / tp) rows (the last shard zero-padded); the embedding
sums the ranks' lookups, the LM head gathers the ranks' logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmrpc.engine.parallel import TensorParallel


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]  # engine/loader.py calls it

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape != (self.num_embeddings, param.shape[1]):
            raise ValueError(f"embedding shape {tuple(loaded_weight.shape)} does not fit "
                             f"({self.num_embeddings}, {param.shape[1]})")
        rows = min(self.rows_per_rank, self.num_embeddings - self.vocab_start)
        param.data[:rows].copy_(loaded_weight.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.rows_per_rank)
        y = F.embedding(local * mine, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states → logits over the whole vocabulary (the gather undoes the row split)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather(F.linear(hidden, self.weight), dim=-1)
        return logits[..., : self.num_embeddings]
