"""Building blocks of the DINOv2 Vision Transformer, one concern per module."""

from lvd.embeddings.layers.attention import Attention
from lvd.embeddings.layers.block import Block
from lvd.embeddings.layers.drop_path import DropPath, drop_path
from lvd.embeddings.layers.layer_scale import LayerScale
from lvd.embeddings.layers.mlp import Mlp
from lvd.embeddings.layers.patch_embed import PatchEmbed
from lvd.embeddings.layers.swiglu import SwiGLUFFN, swiglu_hidden_features

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
