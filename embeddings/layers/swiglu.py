"""SwiGLU feed-forward (ViT-g): one fused input projection w12 -> silu(x1) * x2 -> w3.

Key names (mlp.w12, mlp.w3) follow the official DINOv2 giant checkpoints.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden_features(dim: int, mlp_ratio: float = 4.0) -> int:
    """Two thirds of the MLP width (same parameter count), rounded up to a multiple of 8, as DINOv2."""
    hidden = int(dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)
