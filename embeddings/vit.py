"""The DINOv2 Vision Transformer, with parameter names equal to the official checkpoints' keys.

State-dict keys: cls_token, pos_embed, register_tokens (when > 0), mask_token,
patch_embed.proj.{weight,bias}, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
mlp.fc1, mlp.fc2 (or mlp.w12, mlp.w3 for SwiGLU), ls2.gamma}, norm.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvd.embeddings.layers import Block, Mlp, PatchEmbed, SwiGLUFFN, swiglu_hidden_features


class ArchConfig(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" | "swiglu"


ARCHS: dict[str, ArchConfig] = {
    "vit_tiny": ArchConfig(192, 12, 3, "mlp"),  # DeiT-Ti
    # ViT-Tiny's width, 4 blocks: the tiny pretraining config, which must learn within a CPU session.
    "vit_tiny_d4": ArchConfig(192, 4, 3, "mlp"),
    "vit_small": ArchConfig(384, 12, 6, "mlp"),
    "vit_base": ArchConfig(768, 12, 12, "mlp"),
    "vit_large": ArchConfig(1024, 24, 16, "mlp"),
    "vit_giant2": ArchConfig(1536, 40, 24, "swiglu"),
}

FFN_LAYERS = ("auto", "mlp", "swiglu", "swiglufused")


@torch.no_grad()
def _trunc_normal_(t: Tensor, std: float) -> Tensor:
    """Same distribution as nn.init.trunc_normal_(t, std=std) (cut at +-2, i.e. 100 std, as DINOv2 calls it),
    without its slow erfinv sampling on CPU."""
    return t.normal_(0.0, std).clamp_(-2.0, 2.0)


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        if ffn_layer not in ("mlp", "swiglu", "swiglufused"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {ffn_layer!r}")
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_register_tokens = num_register_tokens
        self.ffn_layer = "mlp" if ffn_layer == "mlp" else "swiglu"
        # DINOv2 trains with a 0.1 offset in the interpolation scale; its register models use 0 + antialias.
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        # Stochastic depth grows linearly with depth, as in DINOv2.
        rates = (
            [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
            if drop_path_rate
            else [0.0] * depth
        )
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, self._make_ffn(embed_dim, mlp_ratio), rates[i], layerscale_init)
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def _make_ffn(self, dim: int, mlp_ratio: float) -> nn.Module:
        if self.ffn_layer == "mlp":
            return Mlp(dim, int(dim * mlp_ratio))
        return SwiGLUFFN(dim, swiglu_hidden_features(dim, mlp_ratio))

    def init_weights(self) -> None:
        """DINOv2's init: truncated normal (std 0.02) weights, zero biases, tiny CLS/register tokens."""
        if self.pos_embed.is_meta:  # built to receive a checkpoint: nothing to initialise
            return
        _trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """Position embeddings for an input of height x width pixels: [1, 1 + h*w/patch^2, D]."""
        h0, w0 = height // self.patch_size, width // self.patch_size
        n = self.pos_embed.shape[1] - 1
        m = int(math.sqrt(n))
        if m * m != n:
            raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
        if (h0, w0) == (m, m):
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()  # bicubic in low precision shifts the embeddings
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m)
            grid = F.interpolate(
                grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias
            )
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} != {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """[B, 3, H, W] -> [B, 1 + R + N, D]: CLS, registers, then patch tokens (+ position)."""
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            # iBOT: masked patches become the learned mask token before positions are added.
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.interpolate_pos_encoding(h, w, x.dtype)
        if self.register_tokens is not None:
            # Registers carry no position embedding (Darcet et al. 2024).
            regs = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
        return x

    def _outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Token outputs for a batch; a list of batches (e.g. global and local crops) gives a list of dicts."""
        if isinstance(x, list):
            masks_list = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks_list, strict=True)]
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._outputs(x, masks)

    def get_intermediate_layers(self, x: Tensor, n: int = 1, norm: bool = True) -> list[Tensor]:
        """Patch tokens [B, N, D] of the last `n` blocks (linear-probe and segmentation evaluations)."""
        x = self.prepare_tokens(x)
        keep = set(range(len(self.blocks) - n, len(self.blocks)))
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in keep:
                out.append(x)
        return [(self.norm(o) if norm else o)[:, 1 + self.num_register_tokens :] for o in out]

    def cast_branches(self, dtype: torch.dtype) -> DinoVisionTransformer:
        """Inference in `dtype` (bf16) without autocast: every block's attention and MLP weights are
        cast once, and their inputs at each call, so the matmuls and attention run in `dtype`. The
        patch embedding, LayerNorms, LayerScale and the residual stream stay float32: the sums of
        12-40 blocks and the normalisation statistics keep full precision, as under autocast (which
        recasts the weights at every call). Returns self."""
        for blk in self.blocks:
            blk.attn.to(dtype)
            blk.mlp.to(dtype)
            blk.branch_dtype = dtype
        return self

    def forward(self, x: Tensor) -> Tensor:
        """The normalised CLS token [B, D]."""
        return self.forward_features(x)["x_norm_clstoken"]


def build_vit(
    arch: str,
    *,
    patch_size: int = 14,
    num_register_tokens: int = 0,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    layerscale_init: float | None = 1e-5,
    ffn_layer: str = "auto",
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
) -> DinoVisionTransformer:
    """A DINOv2 ViT by name (`ARCHS`); ffn_layer "auto" is SwiGLU for vit_giant2 and MLP otherwise."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if ffn_layer not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose one of {FFN_LAYERS}")
    cfg = ARCHS[arch]
    return DinoVisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        ffn_layer=cfg.ffn if ffn_layer == "auto" else ffn_layer,
        drop_path_rate=drop_path_rate,
        layerscale_init=layerscale_init,
        num_register_tokens=num_register_tokens,
        interpolate_offset=interpolate_offset,
        interpolate_antialias=interpolate_antialias,
    )
