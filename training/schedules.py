"""Per-step schedules of the DINOv2 recipe, as arrays indexed by the global step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """`freeze_steps` zeros, then linear warmup from `start_warmup` (reaching `base` at step
    freeze+warmup), then a half cosine from `base` that lands exactly on `final` at the last step."""
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    freeze_steps = min(freeze_steps, total_steps)
    warmup_steps = min(warmup_steps, total_steps - freeze_steps)
    freeze = np.zeros(freeze_steps)
    warmup = start_warmup + (base - start_warmup) * np.arange(warmup_steps) / max(warmup_steps, 1)
    n = total_steps - freeze_steps - warmup_steps
    if n == 1:
        cosine = np.array([base])
    else:
        t = np.arange(n) / max(n - 1, 1)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([freeze, warmup, cosine]).astype(np.float64)


def warmup_then_constant(start: float, value: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear from `start` to `value` over `warmup_steps` (value reached at step warmup_steps), then flat."""
    steps = np.arange(total_steps)
    frac = np.minimum(steps / max(warmup_steps, 1), 1.0) if warmup_steps > 0 else np.ones(total_steps)
    return start + (value - start) * frac


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """DINOv2's square-root scaling rule: base_lr is the learning rate for a batch of 1024."""
    return base_lr * math.sqrt(global_batch_size / 1024.0)


@dataclass
class Schedules:
    lr: np.ndarray
    last_layer_lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        """All values at a step; steps past the end keep the last value."""
        i = min(step, self.total_steps - 1)
        return {
            k: float(getattr(self, k)[i])
            for k in ("lr", "last_layer_lr", "weight_decay", "momentum", "teacher_temp")
        }


def build_schedules(
    *,
    total_steps: int,
    epoch_length: int,
    global_batch_size: int,
    base_lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    freeze_last_layer_epochs: float,
) -> Schedules:
    """The recipe's schedules; durations in epochs of `epoch_length` steps."""

    def steps(epochs: float) -> int:
        return int(round(epochs * epoch_length))

    peak = scaled_lr(base_lr, global_batch_size)
    lr = cosine_schedule(peak, min_lr, total_steps, warmup_steps=steps(warmup_epochs))
    last_layer_lr = lr.copy()
    last_layer_lr[: steps(freeze_last_layer_epochs)] = 0.0  # prototypes frozen while the backbone settles
    return Schedules(
        lr=lr,
        last_layer_lr=last_layer_lr,
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, total_steps),
        momentum=cosine_schedule(momentum_teacher, final_momentum_teacher, total_steps),
        teacher_temp=warmup_then_constant(
            warmup_teacher_temp, teacher_temp, total_steps, steps(warmup_teacher_temp_epochs)
        ),
    )
