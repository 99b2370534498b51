"""An embedding model ready for inference: preprocessed batch in, L2-normalised float32 vectors out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lvd.embeddings.checkpoints import CheckpointError, load_backbone
from lvd.embeddings.copy_descriptor import CopyDescriptor
from lvd.embeddings.hardware import default_device, inference_dtype
from lvd.embeddings.preprocess import PreprocessConfig, normalize
from lvd.embeddings.vit import DinoVisionTransformer, build_vit
from lvd.schemas.job_spec import ModelSpec

# Random-init models (weights: random, for tests) are seeded so every replica computes the same vectors.
RANDOM_INIT_SEED = 0


@dataclass
class EmbeddingModel:
    """A backbone in eval mode with how to call it: `model(batch) -> [B, dim]` L2-normalised float32."""

    module: nn.Module
    dim: int
    preprocess: PreprocessConfig
    device: torch.device
    compute_dtype: torch.dtype | None  # None = full fp32
    batch_size: int = 32
    # The module holds its compute_dtype weights itself (a ViT after `cast_branches`); otherwise a
    # compute_dtype runs under autocast.
    cast_once: bool = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Any = self.module(x)
        if isinstance(out, (tuple, list)):  # some TorchScript exports return (embedding, ...)
            out = out[0]
        if isinstance(out, dict):
            out = out["x_norm_clstoken"]
        return out.reshape(out.shape[0], -1)

    def embed(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """float32 [B, 3, S, S] normalised images -> float32 [B, dim], rows of unit length."""
        x = torch.as_tensor(batch).to(self.device, torch.float32, non_blocking=True)
        with torch.inference_mode():
            if self.compute_dtype is not None and not self.cast_once:
                with torch.autocast(self.device.type, dtype=self.compute_dtype):
                    out = self._forward(x)
            else:
                out = self._forward(x)
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy()

    def embed_uint8(self, crops: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] crops (from `prepare_image`) -> [B, dim]; normalisation runs here."""
        return self.embed(normalize(torch.as_tensor(crops).to(self.device, non_blocking=True)))

    __call__ = embed


def build_module(spec: ModelSpec) -> nn.Module:
    """The spec's backbone: the built-in copy descriptor, loaded weights (checked against `sha256` when
    given), or a seeded random init when weights is "random"."""
    if spec.arch == "copy_descriptor":
        return CopyDescriptor()
    if spec.weights is None:
        raise ValueError('weights is required: a checkpoint path or URL, or "random" for a random init')
    if not spec.random_init:
        arch = None if spec.arch == "torchscript" else spec.arch
        module = load_backbone(spec.weights, spec.format, arch, sha256=spec.sha256)
        is_vit = isinstance(module, DinoVisionTransformer)
        if is_vit == (spec.arch == "torchscript"):
            got = "a DINOv2 ViT" if is_vit else "a TorchScript model"
            raise CheckpointError(f"{spec.weights} holds {got}, but the spec's arch is {spec.arch!r}")
        if is_vit and module.patch_size != spec.patch_size:
            raise CheckpointError(
                f"{spec.weights}: patch size {module.patch_size}, spec says {spec.patch_size}"
            )
        return module
    if spec.arch == "torchscript":
        raise ValueError("arch 'torchscript' needs weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build_vit(
            spec.arch,
            patch_size=spec.patch_size,
            num_register_tokens=spec.num_register_tokens,
            img_size=spec.image_size // spec.patch_size * spec.patch_size,
            # LayerScale 1e-5 (the training init) leaves an untrained ViT near the identity, so every
            # image gets almost the same CLS vector; 1.0 gives usable random features instead.
            layerscale_init=1.0,
        )


def load_embedding_model(spec: ModelSpec, device: torch.device | str | None = None) -> EmbeddingModel:
    """Load `spec` onto `device` (CUDA when present), at the spec's precision on that device."""
    device = torch.device(device) if device is not None else default_device()
    module = build_module(spec).eval().to(device)
    for p in module.parameters():
        p.requires_grad_(False)
    precision = spec.precision
    if spec.arch == "copy_descriptor" and precision == "auto":
        # Its hand-made features (colour statistics, content boxes) lose far more to bf16 rounding
        # than a network's, enough to flip copy decisions; it has no large matmul to speed up.
        precision = "float32"
    compute_dtype = inference_dtype(precision, device)
    is_vit = isinstance(module, DinoVisionTransformer)
    if is_vit and compute_dtype is not None:
        # Weights cast once rather than at every call as autocast does; norms and residuals stay fp32.
        module.cast_branches(compute_dtype)
    patch = module.patch_size if is_vit else 1
    pre = PreprocessConfig(
        resize_size=spec.resize_size,
        image_size=spec.image_size,
        patch_size=patch,
        whole=spec.arch == "copy_descriptor",
    )
    model = EmbeddingModel(module, 0, pre, device, compute_dtype, spec.batch_size, cast_once=is_vit)
    if is_vit:
        model.dim = module.embed_dim
    else:  # TorchScript: the output width is only known by running it
        probe = torch.zeros(1, 3, pre.crop_size, pre.crop_size)
        model.dim = int(model.embed(probe).shape[1])
    return model
