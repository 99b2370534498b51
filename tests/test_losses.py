"""DINO / iBOT / KoLeo losses and the DINO head against plain-formula references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lvd.training.heads import DINOHead
from lvd.training.loss import DINOLoss, iBOTPatchLoss, koleo_loss, sinkhorn_knopp


def _softmax(row: list[float], temp: float) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / temp) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _cross_entropy(target: list[float], logits: list[float], temp: float) -> float:
    p = _softmax(logits, temp)
    return -sum(t * math.log(q) for t, q in zip(target, p, strict=True))


def test_dino_loss_with_centering_matches_formula():
    g = torch.Generator().manual_seed(0)
    batch, k, n_local = 3, 7, 2
    student = [torch.randn(batch, k, generator=g) for _ in range(2 + n_local)]
    teacher = [torch.randn(batch, k, generator=g) for _ in range(2)]
    loss_fn = DINOLoss(k, student_temp=0.1, center_momentum=0.9)
    centre = [0.0] * k
    targets = loss_fn.teacher_targets(torch.cat(teacher), teacher_temp=0.04).chunk(2)
    loss = loss_fn(student, list(targets)).item()

    # Reference: targets from the zero centre, CE over every (teacher i, student j != i) pair.
    ref_targets = [
        [_softmax([v - c for v, c in zip(row, centre, strict=True)], 0.04) for row in t.tolist()]
        for t in teacher
    ]
    terms = []
    for j, s in enumerate(student):
        for i, t in enumerate(ref_targets):
            if i != j:
                terms.append(sum(_cross_entropy(t[b], s[b].tolist(), 0.1) for b in range(batch)) / batch)
    assert len(terms) == 2 * (2 + n_local) - 2
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)

    # The centre moved to 0.9 * 0 + 0.1 * mean of the teacher rows, and the next targets use it.
    all_rows = torch.cat(teacher).tolist()
    new_centre = [0.1 * sum(r[c] for r in all_rows) / len(all_rows) for c in range(k)]
    np.testing.assert_allclose(loss_fn.center[0].numpy(), new_centre, rtol=1e-5, atol=1e-7)
    second = loss_fn.teacher_targets(teacher[0], teacher_temp=0.07)
    ref = [
        _softmax([v - c for v, c in zip(row, new_centre, strict=True)], 0.07) for row in teacher[0].tolist()
    ]
    np.testing.assert_allclose(second.numpy(), ref, rtol=1e-5, atol=1e-7)


def _sinkhorn_reference(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """Alternating normalisation in float64 on the [B, K] layout (prototype columns, then sample rows)."""
    q = np.exp(logits.astype(np.float64) / temp)
    b, k = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=0, keepdims=True) * k
        q /= q.sum(axis=1, keepdims=True) * b
    return q * b


@pytest.mark.parametrize("iterations", [3, 200])
def test_sinkhorn_knopp_row_and_column_sums(iterations):
    g = torch.Generator().manual_seed(1)
    b, k = 12, 5
    logits = torch.rand(b, k, generator=g) * 2 - 1  # cosine-like logits
    q = sinkhorn_knopp(logits, 0.07, n_iterations=iterations).double().numpy()
    np.testing.assert_allclose(q, _sinkhorn_reference(logits.numpy(), 0.07, iterations), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(q.sum(axis=1), np.ones(b), rtol=1e-5)  # each sample: a distribution
    col_tol = 1e-4 if iterations > 50 else 0.5
    np.testing.assert_allclose(q.sum(axis=0), np.full(k, b / k), rtol=col_tol)  # equal prototype mass
    assert (q >= 0).all()


def test_sinkhorn_knopp_survives_sharp_temperature():
    logits = torch.tensor([[30.0, -30.0, 0.0], [0.0, 30.0, -30.0], [-30.0, 0.0, 30.0]])
    q = sinkhorn_knopp(logits, 0.04, n_iterations=3)
    assert torch.isfinite(q).all()
    np.testing.assert_allclose(q.sum(dim=1).numpy(), np.ones(3), rtol=1e-5)


def test_ibot_loss_matches_per_image_mean():
    g = torch.Generator().manual_seed(2)
    b, n, k = 4, 6, 5
    masks = torch.zeros(b, n, dtype=torch.bool)
    masks[0, [0, 3]] = True
    masks[2, [1, 2, 4, 5]] = True
    masks[3, 0] = True  # image 1 unmasked: counts in the mean with 0
    m = int(masks.sum())
    student = torch.randn(m, k, generator=g)
    teacher_logits = torch.randn(m, k, generator=g)
    loss_fn = iBOTPatchLoss(k, student_temp=0.1)
    targets = loss_fn.teacher_targets(teacher_logits, teacher_temp=0.05)
    loss = loss_fn(student, targets, masks).item()

    rows = masks.nonzero().tolist()  # (image, patch) of each logit row, in order
    per_image: dict[int, list[float]] = {i: [] for i in range(b)}
    for r, (img, _) in enumerate(rows):
        t = _softmax(teacher_logits[r].tolist(), 0.05)
        per_image[img].append(_cross_entropy(t, student[r].tolist(), 0.1))
    ref = sum(sum(v) / len(v) for v in per_image.values() if v) / b
    assert loss == pytest.approx(ref, rel=1e-5)


def _koleo_reference(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        d = min(math.dist(x[i], x[j]) for j in range(len(x)) if j != i)
        total += math.log(max(d, eps) + eps)
    return -total / len(x)


def test_koleo_matches_nearest_neighbour_formula():
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    assert koleo_loss(x).item() == pytest.approx(_koleo_reference(x.numpy().astype(np.float64)), rel=1e-5)


@pytest.mark.parametrize(
    "x", [torch.randn(1, 8), torch.ones(5, 8), torch.cat([torch.ones(2, 8), torch.randn(3, 8)])]
)
def test_koleo_finite_at_batch_one_and_duplicates(x):
    x = x.clone().requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    if x.shape[0] == 1:
        assert loss.item() == 0.0


def test_dino_head_logits_are_cosines_to_prototypes():
    head = DINOHead(16, 10, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    x = torch.randn(5, 16)
    out = head(x)
    z = head.mlp(x)
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer.parametrizations.weight.original1  # direction; g starts at 1
    w = v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, z @ w.t(), rtol=1e-5, atol=1e-6)
    assert out.abs().max() <= 1 + 1e-5
