"""Multi-head self-attention with one fused qkv projection (key names as in DINOv2: attn.qkv, attn.proj)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Sequence length from which bf16 inference on CPU runs `bf16_cpu_attention` rather than SDPA: its
# per-image loop costs more than it saves on short sequences (26 tokens, a 70 px crop) and less
# on long ones (257 tokens, 224 px); the bound lies between the two lengths measured.
MATMUL_ATTENTION_MIN_TOKENS = 128


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
        if (
            qkv.device.type == "cpu"
            and qkv.dtype == torch.bfloat16
            and n >= MATMUL_ATTENTION_MIN_TOKENS
            and not torch.is_grad_enabled()
        ):
            return self.proj(bf16_cpu_attention(qkv, self.num_heads))
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
    """Inference attention in bf16 on CPU: [B, N, 3C] qkv projections -> [B, N, C] (heads side by side).

    Per image, two batched matmuls over its heads and a softmax between them, reading q, k and v
    where the qkv projection wrote them and reusing one scores buffer, so nothing of the batch's
    size is allocated (a fresh buffer per call cost page faults). At ViT sequence lengths (a few
    hundred tokens) this costs less CPU than SDPA's fused CPU kernel, which computes its softmax
    blockwise in float32 (benchmarks/embed.py prints both). The softmax runs in bf16 here: the
    vectors move from float32's by as much as under autocast.
    """
    b, n, c3 = qkv.shape
    d = c3 // (3 * num_heads)
    per_token = qkv.view(b, n, 3, num_heads, d)
    out = qkv.new_empty(b, n, num_heads, d)
    scores = qkv.new_empty(num_heads, n, n)
    heads_out = qkv.new_empty(num_heads, n, d)
    for i in range(b):
        q, k, v = per_token[i].permute(1, 2, 0, 3)  # 3 x [H, N, d], strided views
        # beta=0: the buffer's old values are ignored; alpha applies 1/sqrt(d) inside the matmul.
        torch.baddbmm(scores, q, k.transpose(1, 2), beta=0, alpha=d**-0.5, out=scores)
        torch.bmm(scores.softmax(dim=-1), v, out=heads_out)
        out[i].copy_(heads_out.transpose(0, 1))
    return out.view(b, n, num_heads * d)


def attention_reference(x: Tensor, attn: Attention) -> Tensor:
    """Plain softmax(QK^T / sqrt(d)) V, the formula SDPA must match (used by tests)."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) / (c // h) ** 0.5, dim=-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, c))
