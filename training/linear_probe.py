"""Linear probe: multinomial logistic regression on a frozen backbone's CLS features.

DINOv2's linear evaluation trains a linear layer on frozen features with a grid of learning rates and
keeps the best on validation. At the size of the evaluation sets a CPU run uses (hundreds to thousands
of images) a full-batch L-BFGS fit is exact and deterministic, so the grid here is over the L2 weight
alone, and the weight is chosen on a held-out share of the *training* images: the validation images
score the probe once, so paired comparisons on them stay honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SELECT_SHARE = 0.2  # share of each class's training images that picks the weight decay
MAX_ITER = 100


@dataclass(frozen=True)
class LinearProbe:
    weight: torch.Tensor  # [C, D] on standardised features
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [D] feature standardisation, from the training features
    std: torch.Tensor  # [D]
    weight_decay: float  # the L2 weight chosen on the held-out training images

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [N, C]."""
        return ((features.float() - self.mean) / self.std) @ self.weight.t() + self.bias


def _fit(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + weight_decay/2 * |W|^2 over (W, b), full batch, from zero."""
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    x64 = x.double()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=MAX_ITER, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x64 @ w.t() + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def _held_out_rows(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A boolean mask: `share` of each class's rows (at least one, and never all of a class)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if rows.size < 2:
            continue
        n = min(max(1, int(round(share * rows.size))), rows.size - 1)
        held[rng.permutation(rows)[:n]] = True
    return held


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    *,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    seed: int = 0,
) -> LinearProbe:
    """Fit on the training features: the weight decay that scores best on a held-out share of them
    (the smaller one on a tie), then a refit on all of them."""
    x = features.float()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    held = torch.from_numpy(_held_out_rows(y.numpy(), SELECT_SHARE, seed))
    best, best_acc = weight_decays[0], -1.0
    if held.any() and (~held).any():
        for wd in weight_decays:
            w, b = _fit(z[~held], y[~held], num_classes, wd)
            acc = float(((z[held] @ w.t() + b).argmax(1) == y[held]).float().mean())
            if acc > best_acc:
                best, best_acc = wd, acc
    w, b = _fit(z, y, num_classes, best)
    return LinearProbe(w, b, mean, std, best)
