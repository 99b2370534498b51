"""Multi-head self-attention with one fused qkv projection (key names as in DINOv2: attn.qkv, attn.proj)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # [B, N, 3, H, hd] -> 3 x [B, H, N, hd]
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and x.requires_grad and torch.is_autocast_enabled("cpu"):
            # bf16 training on CPU: the fused CPU kernel's bf16 backward is several times slower
            # than autograd through two batched bf16 matmuls at ViT sequence lengths.
            w = torch.softmax((q * (c // self.num_heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
            x = w @ v
        else:
            # SDPA picks flash / memory-efficient kernels on GPU and a fused kernel on CPU.
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def attention_reference(x: Tensor, attn: Attention) -> Tensor:
    """Plain softmax(QK^T / sqrt(d)) V, the formula SDPA must match (used by tests)."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) / (c // h) ** 0.5, dim=-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, c))
