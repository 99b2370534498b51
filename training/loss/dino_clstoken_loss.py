"""DINO self-distillation loss on the CLS token, with teacher centering or Sinkhorn-Knopp."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(x: Tensor, op=None) -> Tensor:
    """In-place sum (or `op`) over ranks; a no-op in a single process."""
    if world_size() > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temperature: float, n_iterations: int = 3) -> Tensor:
    """Teacher targets [B, K] with equal prototype mass (SwAV): each row sums to 1, each column to B/K.

    Rows are samples (all ranks' rows count in B), columns prototypes. The last normalisation is
    over rows, so row sums are exact and column sums approach B/K as iterations grow.
    """
    logits = logits.float() / temperature
    # exp() of a 0.04-temperature logit overflows without the shift; a constant shift cancels out.
    shift = all_reduce(logits.max().clone(), dist.ReduceOp.MAX if world_size() > 1 else None)
    q = torch.exp(logits - shift).t()  # [K, B]
    n_samples = all_reduce(torch.tensor(q.shape[1], dtype=torch.float32, device=q.device)).item()
    n_protos = q.shape[0]
    q /= all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True))  # each prototype gets mass 1/K
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)  # each sample gets mass 1/B
        q /= n_samples
    return (q * n_samples).t()


class DINOLoss(nn.Module):
    """Cross-entropy between teacher targets of the global crops and student outputs of every crop.

    `forward` averages H(teacher view i, student view j) over all pairs except a global crop
    against itself (the first `len(teacher)` student views are the global crops, in the same order).
    """

    def __init__(
        self,
        out_dim: int,
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
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Targets for [B, K] teacher logits; with centering this also moves the centre (EMA)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        targets = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        self.update_center(teacher_logits)
        return targets

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        batch_sum = all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        batch_center = batch_sum / (teacher_logits.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

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
