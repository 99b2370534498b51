"""Image to patch tokens: a strided convolution (key names patch_embed.proj.{weight,bias})."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    def __init__(
        self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input {h}x{w} is not a multiple of patch size {self.patch_size}; crop it first "
                "(embeddings.preprocess crops to the nearest smaller multiple)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
