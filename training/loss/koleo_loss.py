"""KoLeo regulariser (Sablayrolles et al. 2019): spread the batch by pushing each point from its nearest neighbour."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """-mean_i log(min_{j != i} ||x_i - x_j|| + eps) over L2-normalised rows of [B, D].

    Finite by construction: batch 1 has no neighbour (loss 0, still attached to the graph), and
    identical rows give distance 0 whose gradient is cut by the clamp instead of dividing by zero.
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # below any cosine, so a point is never its own neighbour
            nearest = dots.argmax(dim=1)
        sq = (x - x[nearest]).pow(2).sum(dim=-1).clamp(min=eps * eps)
        return -torch.log(sq.sqrt() + eps).mean()
