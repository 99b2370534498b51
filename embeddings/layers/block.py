"""Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lvd.embeddings.layers.attention import Attention
from lvd.embeddings.layers.drop_path import DropPath
from lvd.embeddings.layers.layer_scale import LayerScale


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: nn.Module,
        drop_path: float = 0.0,
        layerscale_init: float | None = 1e-5,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # None: attention and MLP run in the input's dtype. Else their weights are in this dtype and
        # their inputs are cast to it, while the norms, LayerScale and the residual stream keep the
        # input's dtype (see DinoVisionTransformer.cast_branches).
        self.branch_dtype: torch.dtype | None = None

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.branch_dtype
        h = self.norm1(x)
        x = x + self.drop_path1(self.ls1(self.attn(h if dtype is None else h.to(dtype))))
        h = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(h if dtype is None else h.to(dtype))))
