"""Multi-head self-attention with one fused qkv projection (key names as in DINOv2: attn.qkv, attn.proj)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Bound on the attention scores `bf16_cpu_attention` holds at once.
SCORES_BYTES = 64 << 20


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
        qkv = self.qkv(x)
        if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            x = bf16_cpu_attention(qkv, self.num_heads)
            return self.proj(x.transpose(1, 2).reshape(b, n, c))
        # [B, N, 3, H, hd] -> 3 x [B, H, N, hd]
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and x.requires_grad and torch.is_autocast_enabled("cpu"):
            # bf16 training on CPU: the fused CPU kernel's bf16 backward is several times slower
            # than autograd through two batched bf16 matmuls at ViT sequence lengths.
            w = torch.softmax((q * (c // self.num_heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
            x = w @ v
        else:
            # SDPA picks flash / memory-efficient kernels on GPU and a fused kernel on CPU.
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def bf16_cpu_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Inference attention in bf16 on CPU: [B, N, 3C] qkv projections -> [B, H, N, C/H].

    Two batched matmuls over (image, head) pairs and a softmax between them. At ViT sequence lengths
    (a few hundred tokens) this costs less CPU than SDPA's fused CPU kernel, which computes its
    softmax blockwise in float32 and reaches a small share of the bf16 matmul rate
    (benchmarks/embed.py measures both). Here the softmax runs in bf16: the vectors move from
    float32's by as much as under autocast.
    """
    b, n, c3 = qkv.shape
    d = c3 // (3 * num_heads)
    bh = b * num_heads
    # One copy puts q, k and v each in [B*H, N, d] order.
    q, k, v = qkv.reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).reshape(3, bh, n, d)
    out = q.new_empty(bh, n, d)
    # The scores of a chunk of (image, head) pairs at a time: few for long sequences (ViT-g at 518 px).
    step = max(1, SCORES_BYTES // (n * n * q.element_size()))
    for s in range(0, bh, step):
        e = min(bh, s + step)
        # beta=0: the uninitialised input is ignored; alpha applies 1/sqrt(d) inside the matmul.
        scores = torch.baddbmm(
            q.new_empty(e - s, n, n), q[s:e], k[s:e].transpose(1, 2), beta=0, alpha=d**-0.5
        )
        torch.bmm(scores.softmax(dim=-1), v[s:e], out=out[s:e])
    return out.view(b, num_heads, n, d)


def attention_reference(x: Tensor, attn: Attention) -> Tensor:
    """Plain softmax(QK^T / sqrt(d)) V, the formula SDPA must match (used by tests)."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) / (c // h) ** 0.5, dim=-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, c))
