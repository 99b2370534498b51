"""Schedules at their landmarks, and the AdamW parameter groups (layer-wise decay, no-decay rules)."""

from __future__ import annotations

import math

import pytest
import torch

from lvd.embeddings.vit import build_vit
from lvd.training.heads import DINOHead
from lvd.training.optim import apply_schedules, build_optimizer, param_groups
from lvd.training.schedules import build_schedules, cosine_schedule, scaled_lr, warmup_then_constant


def test_cosine_schedule_landmarks():
    s = cosine_schedule(1.0, 0.1, total_steps=25, warmup_steps=5, start_warmup=0.2, freeze_steps=4)
    assert len(s) == 25
    assert (s[:4] == 0).all()
    assert s[4] == pytest.approx(0.2)  # warmup starts at start_warmup
    assert s[4 + 5] == pytest.approx(1.0)  # warmup ends exactly at base
    assert s[-1] == pytest.approx(0.1)  # last step exactly at final
    n = 25 - 9  # cosine part: value at position t is final + (base-final)(1+cos(pi t/(n-1)))/2
    t = 7
    assert s[9 + t] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / (n - 1))))
    assert all(a >= b for a, b in zip(s[9:], s[10:], strict=False))  # decreasing after warmup


def test_teacher_temperature_warmup():
    s = warmup_then_constant(0.04, 0.07, total_steps=20, warmup_steps=8)
    assert s[0] == pytest.approx(0.04)
    assert s[4] == pytest.approx(0.055)
    assert s[8] == pytest.approx(0.07)
    assert s[-1] == pytest.approx(0.07)


def test_recipe_schedules():
    epoch, epochs = 10, 6
    s = build_schedules(
        total_steps=epoch * epochs,
        epoch_length=epoch,
        global_batch_size=256,
        base_lr=0.004,
        min_lr=1e-6,
        warmup_epochs=2,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.992,
        final_momentum_teacher=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=3,
        freeze_last_layer_epochs=1,
    )
    peak = 0.004 * math.sqrt(256 / 1024)
    assert scaled_lr(0.004, 256) == pytest.approx(peak)
    assert s.lr[0] == 0.0 and s.lr[2 * epoch] == pytest.approx(peak) and s.lr[-1] == pytest.approx(1e-6)
    assert (s.last_layer_lr[:epoch] == 0).all() and s.last_layer_lr[epoch] == pytest.approx(s.lr[epoch])
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[-1] == pytest.approx(1.0)
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[3 * epoch] == pytest.approx(0.07)
    assert s.at(10**6)["lr"] == pytest.approx(1e-6)  # past the end: last value


def test_param_groups_layerwise_decay_and_no_weight_decay():
    backbone = build_vit("vit_tiny", img_size=28, num_register_tokens=2)
    head = DINOHead(backbone.embed_dim, 16, hidden_dim=8, bottleneck_dim=4)
    groups = param_groups(
        {"backbone": backbone, "dino_head": head}, n_blocks=12, layerwise_decay=0.9, patch_embed_lr_mult=0.2
    )
    by_name = {g["name"]: g for g in groups}
    n_params = sum(1 for _ in backbone.parameters()) + sum(1 for _ in head.parameters())
    assert len(groups) == n_params

    assert by_name["backbone.blocks.3.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9 ** (13 - 4))
    assert by_name["backbone.blocks.11.mlp.fc2.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.9**13 * 0.2)
    assert by_name["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.9**13)
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0

    no_wd = [n for n, g in by_name.items() if g["wd_multiplier"] == 0.0]
    for name in (
        "backbone.blocks.0.attn.qkv.bias",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.ls1.gamma",
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.register_tokens",
        "backbone.mask_token",
        "backbone.norm.bias",
        "dino_head.mlp.0.bias",
    ):
        assert name in no_wd, name
    for name in (
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.patch_embed.proj.weight",
        "dino_head.mlp.2.weight",
    ):
        assert by_name[name]["wd_multiplier"] == 1.0, name
    last = [n for n, g in by_name.items() if g["is_last_layer"]]
    assert last and all(n.startswith("dino_head.last_layer") for n in last)

    opt = build_optimizer(groups, (0.9, 0.999))
    apply_schedules(opt, lr=0.01, weight_decay=0.1, last_layer_lr=0.0)
    for group in opt.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 0.01 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_multiplier"])
    # lr 0 freezes the prototypes for the step, whatever their gradient.
    before = head.last_layer.parametrizations.weight.original1.detach().clone()
    head(torch.randn(3, backbone.embed_dim)).sum().backward()
    opt.step()
    torch.testing.assert_close(head.last_layer.parametrizations.weight.original1, before)
