"""iBOT loss: the student predicts the teacher's targets for patches masked in its input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lvd.training.loss.teacher_targets import TeacherTargets


class iBOTPatchLoss(TeacherTargets):  # noqa: N801 - the method's name
    """Per image: mean cross-entropy over its masked patches; then mean over images (masked or not)."""

    def forward(self, student_logits: Tensor, teacher_targets: Tensor, masks: Tensor) -> Tensor:
        """student_logits/teacher_targets: [M, K] rows for `masks.nonzero()` in order; masks: [B, N] bool."""
        if masks.shape[0] == 0:
            raise ValueError("iBOT loss needs a non-empty batch")
        ce = -(teacher_targets * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)
        per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # weight of one patch of each image
        weights = per_image.unsqueeze(-1).expand_as(masks)[masks]
        return (ce * weights).sum() / masks.shape[0]
