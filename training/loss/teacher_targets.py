"""Teacher targets shared by the DINO and iBOT losses: softmax with an EMA centre, or Sinkhorn-Knopp."""

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


class TeacherTargets(nn.Module):
    """Turns teacher logits [M, K] into targets; with centering it also keeps the centre (an EMA)."""

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
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        targets = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        self.update_center(teacher_logits)
        return targets

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        # Rows over all ranks; iBOT may have none on a step (no masked patches).
        n = all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        if n.item() == 0:
            return
        batch_center = all_reduce(teacher_logits.float().sum(dim=0, keepdim=True)) / n
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
