"""DINO self-distillation loss on the CLS token (teacher targets: centering or Sinkhorn-Knopp)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lvd.training.loss.teacher_targets import TeacherTargets


class DINOLoss(TeacherTargets):
    """Cross-entropy between teacher targets of the global crops and student outputs of every crop.

    `forward` averages H(teacher view i, student view j) over all pairs except a global crop
    against itself (the first `len(teacher)` student views are the global crops, in the same order).
    """

    def forward(self, student_logits: list[Tensor], teacher_targets: list[Tensor]) -> Tensor:
        """Mean over (teacher view, student view) pairs of the batch-mean cross-entropy."""
        total, terms = student_logits[0].new_zeros((), dtype=torch.float32), 0
        for j, s in enumerate(student_logits):
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for i, t in enumerate(teacher_targets):
                if i == j:
                    continue  # a global crop is not its own target
                total = total - (t * log_p).sum(dim=-1).mean()
                terms += 1
        if terms == 0:
            raise ValueError("DINO loss needs at least two views")
        return total / terms
