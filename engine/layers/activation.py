"""The gated MLP activation: silu(gate) * up over a merged [gate | up] projection."""
from __future__ import annotations

import torch
from torch import nn

from llmrpc.kernels import fused


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.silu_and_mul(x)
