"""iBOT loss: the student predicts the teacher's targets for patches masked in its input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.loss.dino_clstoken_loss import all_reduce, sinkhorn_knopp


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the method's name
    """Per image: mean cross-entropy over its masked patches; then mean over images (masked or not)."""

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
    ) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Targets for the [M, K] teacher logits of the masked patches (M over the whole batch)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        targets = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        self.update_center(teacher_logits)
        return targets

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        n = all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        if n.item() == 0:
            return
        batch_center = all_reduce(teacher_logits.float().sum(dim=0, keepdim=True)) / n
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def forward(self, student_logits: Tensor, teacher_targets: Tensor, masks: Tensor) -> Tensor:
        """student_logits/teacher_targets: [M, K] rows for `masks.nonzero()` in order; masks: [B, N] bool."""
        if masks.shape[0] == 0:
            raise ValueError("iBOT loss needs a non-empty batch")
        ce = -(teacher_targets * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)
        per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # weight of one patch of each image
        weights = per_image.unsqueeze(-1).expand_as(masks)[masks]
        return (ce * weights).sum() / masks.shape[0]
