"""Building blocks of the DINOv2 Vision Transformer, one concern per module."""

from embeddings.layers.attention import Attention
from embeddings.layers.block import Block
from embeddings.layers.drop_path import DropPath, drop_path
from embeddings.layers.layer_scale import LayerScale
from embeddings.layers.mlp import Mlp
from embeddings.layers.patch_embed import PatchEmbed
from embeddings.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "drop_path",
    "swiglu_hidden_features",
]
