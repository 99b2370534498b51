"""AdamW parameter groups of the DINOv2 recipe and the per-step update of their lr / weight decay."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_TOKENS = ("pos_embed", "mask_token", "cls_token", "register_tokens")


def layer_id(name: str, n_blocks: int) -> int:
    """0 for the embeddings, i + 1 for blocks.i, n_blocks + 1 for the rest (final norm)."""
    if any(key in name for key in _EMBEDDINGS):
        return 0
    if "blocks." in name:
        parts = name.split(".")
        return int(parts[parts.index("blocks") + 1]) + 1
    return n_blocks + 1


def param_groups(
    modules: dict[str, nn.Module],
    *,
    n_blocks: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
) -> list[dict]:
    """One AdamW group per parameter with its multipliers.

    backbone: lr x layerwise_decay ** (n_blocks + 1 - layer); patch_embed another x patch_embed_lr_mult;
    no weight decay on biases, norms, LayerScale gammas and learned tokens; heads at full lr;
    `is_last_layer` marks the prototypes (frozen at the start of training).
    """
    groups = []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            lr_mult = 1.0
            if prefix == "backbone":
                lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
                if "patch_embed" in name:
                    lr_mult *= patch_embed_lr_mult
            no_wd = (
                name.endswith(".bias") or "norm" in name or "gamma" in name or any(t in name for t in _TOKENS)
            )
            groups.append(
                {
                    "params": [p],
                    "name": f"{prefix}.{name}",
                    "lr_multiplier": lr_mult,
                    "wd_multiplier": 0.0 if no_wd else 1.0,
                    "is_last_layer": "last_layer" in name,
                }
            )
    return groups


def fuse_groups(groups: Iterable[dict]) -> list[dict]:
    """Merge groups with the same multipliers (fewer groups -> faster fused AdamW)."""
    fused: dict[tuple, dict] = {}
    for g in groups:
        key = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        if key not in fused:
            fused[key] = {**{k: v for k, v in g.items() if k != "name"}, "params": []}
        fused[key]["params"].extend(g["params"])
    return list(fused.values())


def build_optimizer(groups: list[dict], betas: tuple[float, float]) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, betas=betas, lr=0.0, weight_decay=0.0)


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr: float
) -> None:
    """Set every group's lr and weight decay for this step from the schedule values."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
