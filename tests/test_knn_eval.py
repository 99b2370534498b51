"""Weighted kNN voting against a brute-force reference, and `lvd eval knn` end to end on a tiny folder."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from typer.testing import CliRunner

from lvd.embeddings.checkpoints import save_lvd_backbone
from lvd.embeddings.vit import build_vit
from lvd.jobs.cli import app
from lvd.training.knn_eval import (
    evaluate_knn,
    knn_scores,
    labelled_splits,
    list_labelled_folder,
    random_init_like,
)


def _reference_scores(train, labels, query, num_classes, k, t):
    out = np.zeros((len(query), num_classes))
    tn = [v / np.linalg.norm(v) for v in train]
    for q, qv in enumerate(query):
        qv = qv / np.linalg.norm(qv)
        sims = sorted(((float(np.dot(qv, v)), i) for i, v in enumerate(tn)), reverse=True)[:k]
        for s, i in sims:
            out[q, labels[i]] += math.exp(s / t)
    return out


def test_knn_scores_match_brute_force():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 6))
    labels = rng.integers(0, 4, size=40)
    query = rng.normal(size=(9, 6))
    got = knn_scores(
        torch.tensor(train), torch.tensor(labels), torch.tensor(query), 4, k=7, temperature=0.07, chunk=4
    )
    np.testing.assert_allclose(got.numpy(), _reference_scores(train, labels, query, 4, 7, 0.07), rtol=1e-4)
    # k larger than the memory bank: everyone votes.
    got = knn_scores(torch.tensor(train[:5]), torch.tensor(labels[:5]), torch.tensor(query), 4, k=20)
    np.testing.assert_allclose(
        got.numpy(), _reference_scores(train[:5], labels[:5], query, 4, 20, 0.07), rtol=1e-4
    )


def _write_separable_folder(root, n_per_class=4):
    # Two classes a random ViT already tells apart: dark vs bright images with a little noise.
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for name, level in (("dark", 30), ("bright", 220)):
            d = root / split / name
            d.mkdir(parents=True)
            for j in range(n_per_class):
                arr = np.clip(level + rng.normal(0, 8, (40, 40, 3)), 0, 255).astype(np.uint8)
                PIL.Image.fromarray(arr).save(d / f"{j}.png")
    (root / "train" / "dark" / "notes.txt").write_text("not an image")


def test_eval_knn_on_labelled_folder_and_cli(tmp_path):
    _write_separable_folder(tmp_path / "data")
    split = list_labelled_folder(tmp_path / "data" / "train")
    assert split.classes == ["bright", "dark"] and len(split.paths) == 8
    torch.manual_seed(0)
    backbone = build_vit("vit_tiny", img_size=28).eval()
    result = evaluate_knn(backbone, tmp_path / "data", k=3)
    assert result["n_train"] == 8 and result["n_val"] == 8 and result["image_size"] == 28
    assert result["top1"] == pytest.approx(1.0)

    export = save_lvd_backbone(backbone, tmp_path / "teacher.pth")
    out = CliRunner().invoke(app, ["eval", "knn", str(export), str(tmp_path / "data"), "--k", "3"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.output.strip().splitlines()[-1])
    baseline = printed.pop("baseline")
    assert printed == result
    assert baseline["backbone"] == "random init" and 0 <= baseline["top1"] <= 1
    # Paired counts on the same val images: their difference is the two top-1s' difference.
    diff = baseline["right_only_checkpoint"] - baseline["right_only_baseline"]
    assert diff == round((result["top1"] - baseline["top1"]) * result["n_val"])
    none = CliRunner().invoke(app, ["eval", "knn", str(export), str(tmp_path / "data"), "--baseline", "none"])
    assert "baseline" not in json.loads(none.output.strip().splitlines()[-1])

    bad = CliRunner().invoke(app, ["eval", "knn", str(export), str(tmp_path / "missing")])
    assert bad.exit_code == 2


def test_class_folders_are_split_per_class_the_same_way_every_time(tmp_path):
    root = tmp_path / "flat"
    sizes = {"a": 10, "b": 3, "c": 2, "d": 1}
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            PIL.Image.new("RGB", (8, 8), (j, 0, 0)).save(root / name / f"img{j}.png")
    train, val = labelled_splits(root)
    assert train.classes == val.classes == ["a", "b", "c", "d"]
    assert not set(train.paths) & set(val.paths)
    assert len(train.paths) + len(val.paths) == sum(sizes.values())
    per_class_val = np.bincount(val.labels, minlength=4).tolist()
    assert per_class_val == [2, 1, 1, 0]  # 20% of 10; at least one of 3 and of 2; a lone image trains
    again = labelled_splits(root)
    assert again[1].paths == val.paths
    # Renaming the folder keeps the split (it is drawn from file names, not paths).
    root.rename(tmp_path / "moved")
    assert [p.name for p in labelled_splits(tmp_path / "moved")[1].paths] == [p.name for p in val.paths]


def test_bad_labelled_layouts_are_named(tmp_path):
    (tmp_path / "half" / "train" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/ and val/"):
        labelled_splits(tmp_path / "half")
    (tmp_path / "one" / "only").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(ValueError, match="at least two class folders"):
        labelled_splits(tmp_path / "one")


def test_random_init_like_reinitialises_every_weight():
    torch.manual_seed(0)
    trained = build_vit("vit_tiny", img_size=28, layerscale_init=1.0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)  # stands in for training: every weight moved
    fresh = random_init_like(trained)
    for (name, a), b in zip(trained.named_parameters(), fresh.parameters(), strict=True):
        assert not torch.equal(a, b), name
    again = random_init_like(trained)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters(), strict=True))


# ---------------------------------------------------------------- linear probe


def _one_direction_classes(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Three classes told apart by one feature alone; 31 others are noise 20x as large. Cosine
    neighbours follow the noise, a linear map finds the one direction."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.normal(0, 20.0, (n, 32))
    x[:, 7] = 3.0 * labels + rng.normal(0, 0.2, n)
    return torch.from_numpy(x).float(), labels


def test_linear_probe_finds_a_direction_cosine_neighbours_miss():
    from lvd.training.linear_probe import fit_linear_probe

    train_x, train_y = _one_direction_classes(300, 0)
    val_x, val_y = _one_direction_classes(200, 1)
    probe = fit_linear_probe(train_x, train_y, 3)
    linear_acc = float((probe.scores(val_x).argmax(1).numpy() == val_y).mean())
    knn = knn_scores(train_x, torch.from_numpy(train_y), val_x, 3)
    knn_acc = float((knn.argmax(1).numpy() == val_y).mean())
    assert linear_acc > 0.95 and knn_acc < 0.6, (linear_acc, knn_acc)
    # Fitted on standardised features: a feature's units do not change the predictions.
    scaled = train_x.clone()
    scaled[:, 7] *= 1000.0
    val_scaled = val_x.clone()
    val_scaled[:, 7] *= 1000.0
    rescaled = fit_linear_probe(scaled, train_y, 3)
    assert rescaled.weight_decay == probe.weight_decay
    assert torch.equal(rescaled.scores(val_scaled).argmax(1), probe.scores(val_x).argmax(1))


def test_linear_probe_fit_is_deterministic_and_keeps_to_its_grid():
    from lvd.training.linear_probe import WEIGHT_DECAYS, fit_linear_probe

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    x = rng.normal(0, 1.0, (40, 200))
    x[:, 0] += 1.5 * labels
    feats = torch.from_numpy(x).float()
    a, b = fit_linear_probe(feats, labels, 2), fit_linear_probe(feats, labels, 2)
    assert a.weight_decay == b.weight_decay and torch.equal(a.weight, b.weight)
    assert a.weight_decay in WEIGHT_DECAYS
    only = fit_linear_probe(feats, labels, 2, weight_decays=(0.5,))
    assert only.weight_decay == 0.5
