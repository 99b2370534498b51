"""Student and EMA teacher (backbone + DINO head + optional separate iBOT head) and the loss of one batch."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lvd.embeddings.vit import build_vit
from lvd.training.config import PretrainConfig
from lvd.training.heads import DINOHead
from lvd.training.loss import DINOLoss, iBOTPatchLoss, koleo_loss
from lvd.training.loss.teacher_targets import all_reduce


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Network(nn.Module):
    """Backbone and heads; `forward` is the whole student (or teacher) pass so DDP/FSDP can wrap it.

    Returns the global crops' backbone CLS tokens [2B, D], CLS logits of all crops [2B + L*B, K]
    (global first) and iBOT logits of the masked patches [M, K'] (masks.nonzero() order).
    """

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(
        self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor, mask_input: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        g = self.backbone.forward_features(global_crops, masks=masks if mask_input else None)
        cls = [g["x_norm_clstoken"]]
        if local_crops is not None:
            cls.append(self.backbone.forward_features(local_crops)["x_norm_clstoken"])
        patches = g["x_norm_patchtokens"][masks]
        n_cls = sum(c.shape[0] for c in cls)
        if self.ibot_head is None:
            # Shared head: one call over CLS tokens and masked patches together.
            out = self.dino_head(torch.cat([*cls, patches]))
            return cls[0], out[:n_cls], out[n_cls:]
        return cls[0], self.dino_head(torch.cat(cls)), self.ibot_head(patches)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = self.build_network(cfg, drop_path_rate=cfg.model.drop_path_rate)
        self.teacher = self.build_network(cfg, drop_path_rate=0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        centering = cfg.train.centering
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, centering=centering)
        ibot_dim = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        self.ibot_loss = iBOTPatchLoss(ibot_dim, centering=centering)

    @staticmethod
    def build_network(cfg: PretrainConfig, drop_path_rate: float) -> Network:
        m = cfg.model
        backbone = build_vit(
            m.arch,
            patch_size=m.patch_size,
            num_register_tokens=m.num_register_tokens,
            img_size=cfg.crops.global_crops_size,
            drop_path_rate=drop_path_rate,
            layerscale_init=m.layerscale_init,
            ffn_layer=m.ffn_layer,
        )
        d = cfg.dino
        dino_head = DINOHead(
            backbone.embed_dim, d.head_n_prototypes, d.head_hidden_dim, d.head_bottleneck_dim, d.head_nlayers
        )
        ibot_head = None
        if cfg.ibot.separate_head:
            i = cfg.ibot
            ibot_head = DINOHead(
                backbone.embed_dim,
                i.head_n_prototypes,
                i.head_hidden_dim,
                i.head_bottleneck_dim,
                i.head_nlayers,
            )
        return Network(backbone, dino_head, ibot_head)

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    def forward_backward(
        self,
        crops: dict[str, Tensor],
        masks: Tensor,
        teacher_temp: float,
        *,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        autocast: contextlib.AbstractContextManager | None = None,
        koleo_groups: int = 1,
    ) -> dict[str, Tensor]:
        """Losses of one batch, with the backward pass done. `student`/`teacher` are the (possibly
        DDP/FSDP-wrapped) networks; `crops` from `augment_batch`, `masks` [2B, N] for the global crops.
        `koleo_groups`: the batch holds this many data ranks' slices (in order); KoLeo is taken within
        each slice and averaged, as ranks that each hold one slice do (DDP averages over ranks)."""
        student = student or self.student
        teacher = teacher or self.teacher
        autocast = autocast or contextlib.nullcontext()
        global_crops, local_crops = crops["global_crops"], crops.get("local_crops")
        n_global = 2
        batch = global_crops.shape[0] // n_global
        # Whether there are iBOT targets is decided over all ranks: Sinkhorn-Knopp and the centre
        # all-reduce, so every rank must take the same branch (a rank may hold no masked patch).
        n_masked = all_reduce(masks.sum().to(torch.int64))
        n_masked = int(n_masked)

        with torch.no_grad(), autocast:
            _, t_cls, t_patch = teacher(global_crops, None, masks, False)
            t_cls_targets = self.dino_loss.teacher_targets(t_cls, teacher_temp).chunk(n_global)
            t_patch_targets = self.ibot_loss.teacher_targets(t_patch, teacher_temp) if n_masked else None

        with autocast:
            s_global_cls, s_cls, s_patch = student(global_crops, local_crops, masks, True)
        views = list(s_cls.float().split(batch))
        losses = {"dino": self.dino_loss(views, list(t_cls_targets))}
        views_cls = s_global_cls.chunk(n_global)
        if koleo_groups == 1:
            losses["koleo"] = sum(koleo_loss(c) for c in views_cls)
        else:
            losses["koleo"] = sum(
                sum(koleo_loss(g) for g in c.chunk(koleo_groups)) / koleo_groups for c in views_cls
            )
        losses["ibot"] = (
            self.ibot_loss(s_patch, t_patch_targets, masks) if n_masked else s_patch.float().sum() * 0.0
        )
        total = (
            self.cfg.dino.loss_weight * losses["dino"]
            + self.cfg.dino.koleo_loss_weight * losses["koleo"]
            + self.cfg.ibot.loss_weight * losses["ibot"]
        )
        total.backward()
        losses["total"] = total
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        # Under FSDP both networks are sharded alike: update each rank's local shards. A root module
        # stays unsharded after a forward without backward (the teacher's), so reshard first.
        for net in (self.teacher, self.student):
            for module in net.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        t_params = [_local(p) for p in self.teacher.parameters()]
        s_params = [_local(p.detach()) for p in self.student.parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)

    def student_modules(self) -> dict[str, nn.Module]:
        mods = {"backbone": self.student.backbone, "dino_head": self.student.dino_head}
        if self.student.ibot_head is not None:
            mods["ibot_head"] = self.student.ibot_head
        return mods
