"""kNN classification of a backbone's CLS features on a labelled folder (DINO's weighted k-NN, k=20, T=0.07)."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class LabelledSplit:
    paths: list[Path]
    labels: np.ndarray  # int64 class index per path
    classes: list[str]


def list_labelled_folder(split_dir: Path, classes: list[str] | None = None) -> LabelledSplit:
    """`split_dir/<class>/<image>` (class folders sorted by name unless `classes` fixes the order)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no folder {split_dir}")
    classes = classes or sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    paths, labels = [], []
    for idx, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(idx)
    if not paths:
        raise ValueError(
            f"no images under {split_dir}/<class>/: put each class's images in a folder named after it"
        )
    return LabelledSplit(paths, np.asarray(labels, dtype=np.int64), classes)


VAL_SHARE = 0.2


def _val_draw(name: str) -> float:
    """A uniform draw in [0, 1) from a file name: which split an image falls in, the same on every run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") / 2**64


def labelled_splits(
    data_dir: str | Path, val_share: float = VAL_SHARE
) -> tuple[LabelledSplit, LabelledSplit]:
    """(train, val) of a labelled folder: `DATA/{train,val}/<class>/*` as given, or `DATA/<class>/*`
    split per class by a draw from each file name (`val_share` of each class, at least one image of
    every class with two or more on each side)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no folder {data_dir}")
    if (data_dir / "train").is_dir() and (data_dir / "val").is_dir():
        train = list_labelled_folder(data_dir / "train")
        return train, list_labelled_folder(data_dir / "val", train.classes)
    if (data_dir / "train").is_dir() or (data_dir / "val").is_dir():
        raise ValueError(f"{data_dir} has one of train/ and val/ but not both")
    whole = list_labelled_folder(data_dir)
    if len(whole.classes) < 2:
        raise ValueError(
            f"{data_dir}: kNN evaluation needs at least two class folders, found {whole.classes}"
        )
    is_val = np.zeros(len(whole.paths), dtype=bool)
    for c in range(len(whole.classes)):
        rows = np.flatnonzero(whole.labels == c)
        if rows.size < 2:
            continue
        draws = np.array([_val_draw(whole.paths[r].name) for r in rows])
        n_val = min(max(1, int(round(val_share * rows.size))), rows.size - 1)
        is_val[rows[np.argsort(draws, kind="stable")[:n_val]]] = True

    def pick(mask: np.ndarray) -> LabelledSplit:
        rows = np.flatnonzero(mask)
        return LabelledSplit([whole.paths[r] for r in rows], whole.labels[rows], whole.classes)

    return pick(~is_val), pick(is_val)


def random_init_like(backbone: nn.Module, seed: int = 0) -> nn.Module:
    """The same network with fresh initial weights: the baseline a trained backbone's score is read
    against (what training added, not what the architecture gives for free)."""
    fresh = copy.deepcopy(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if hasattr(fresh, "init_weights"):
            fresh.init_weights()
    return fresh.eval()


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, C]: each of the k most cosine-similar training samples votes exp(sim / T) for its class.

    Features are L2-normalised here; queries are processed in chunks to bound memory.
    """
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        sims = query[start : start + chunk] @ train.t()
        top_sim, top_idx = sims.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def load_eval_backbone(path: str | Path) -> nn.Module:
    """The backbone of a pretraining checkpoint (its teacher) or of any format the embed stage loads."""
    from lvd.training.train import CHECKPOINT_FORMAT, CheckpointRefused, load_checkpoint

    path = Path(path)
    obj = None
    if path.is_file():
        try:
            obj = load_checkpoint(path)
        except CheckpointRefused:
            raise
        except Exception:  # noqa: BLE001 - not a torch.save file (e.g. TorchScript): the loaders below decide
            obj = None

    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        from lvd.training.config import PretrainConfig
        from lvd.training.meta_arch import SSLMetaArch

        cfg = PretrainConfig.model_validate(obj["config"])
        backbone = SSLMetaArch.build_network(cfg, drop_path_rate=0.0).backbone
        prefix = "backbone."
        backbone.load_state_dict(
            {k[len(prefix) :]: v for k, v in obj["teacher"].items() if k.startswith(prefix)}
        )
        return backbone.eval()
    from lvd.embeddings.checkpoints import load_backbone

    return load_backbone(path).eval()


@torch.inference_mode()
def extract_features(
    backbone: nn.Module, paths: list[Path], image_size: int, resize_size: int, batch_size: int = 64
) -> torch.Tensor:
    """CLS features [N, D] with the evaluation preprocessing (resize shorter side, centre crop)."""
    from lvd.embeddings.preprocess import PreprocessConfig, normalize, prepare_image

    cfg = PreprocessConfig(resize_size=resize_size, image_size=image_size, patch_size=backbone.patch_size)
    device = next(backbone.parameters()).device
    feats = []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([prepare_image(p.read_bytes(), cfg) for p in paths[start : start + batch_size]])
        feats.append(backbone(normalize(batch).to(device)).float().cpu())
    return torch.cat(feats)


@dataclass(frozen=True)
class PairedTest:
    """McNemar's test of two models on the same images: only the images where they disagree count."""

    only_a: int  # images model a gets right and model b wrong
    only_b: int
    z: float  # (only_a - only_b) / sqrt(only_a + only_b); |z| > 2 is beyond noise


def paired_test(a_correct: torch.Tensor | np.ndarray, b_correct: torch.Tensor | np.ndarray) -> PairedTest:
    """Per image, whether model a and model b got it right, in the same image order."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results of different lengths: {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return PairedTest(only_a, only_b, (only_a - only_b) / max((only_a + only_b) ** 0.5, 1.0))


@dataclass
class ValScores:
    """Class scores of a labelled set's val images (kNN votes, or a linear probe's logits)."""

    scores: torch.Tensor  # [n_val, C]
    labels: torch.Tensor  # [n_val] true class
    n_train: int
    classes: list[str]
    image_size: int

    @property
    def correct(self) -> torch.Tensor:
        """Per validation image: is the top-scoring class the true one (for paired comparisons)."""
        return self.scores.argmax(1) == self.labels

    @property
    def top1(self) -> float:
        return float(self.correct.float().mean())


def knn_val_scores(
    backbone: nn.Module,
    data_dir: str | Path,
    *,
    k: int = 20,
    temperature: float = 0.07,
    image_size: int | None = None,
    batch_size: int = 64,
) -> ValScores:
    """kNN class scores of the val split of `data_dir` with its train split as the memory bank (see
    `labelled_splits`). Default image size: the backbone's training resolution."""
    train, val = labelled_splits(data_dir)
    return knn_split_scores(
        backbone, train, val, k=k, temperature=temperature, image_size=image_size, batch_size=batch_size
    )


def knn_split_scores(
    backbone: nn.Module,
    train: LabelledSplit,
    val: LabelledSplit,
    *,
    k: int = 20,
    temperature: float = 0.07,
    image_size: int | None = None,
    batch_size: int = 64,
) -> ValScores:
    """kNN class scores of the `val` images with the `train` images as the memory bank."""
    feats = split_features(backbone, train, val, image_size=image_size, batch_size=batch_size)
    return knn_feature_scores(feats, k=k, temperature=temperature)


@dataclass
class SplitFeatures:
    """A backbone's features of both splits of a labelled set: what kNN and the linear probe read."""

    train: torch.Tensor  # [n_train, D]
    val: torch.Tensor  # [n_val, D]
    train_split: LabelledSplit
    val_split: LabelledSplit
    image_size: int


def split_features(
    backbone: nn.Module,
    train: LabelledSplit,
    val: LabelledSplit,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
) -> SplitFeatures:
    """Features of both splits with the evaluation preprocessing. Default image size: the backbone's
    training resolution."""
    if image_size is None:
        size = getattr(getattr(backbone, "patch_embed", None), "img_size", 224)
        image_size = int(size[0] if isinstance(size, tuple | list) else size)
    resize = int(round(image_size * 256 / 224))
    train_f = extract_features(backbone, train.paths, image_size, resize, batch_size)
    val_f = extract_features(backbone, val.paths, image_size, resize, batch_size)
    return SplitFeatures(train_f, val_f, train, val, image_size)


def knn_feature_scores(feats: SplitFeatures, *, k: int = 20, temperature: float = 0.07) -> ValScores:
    """kNN class scores of the val features with the train features as the memory bank."""
    train, val = feats.train_split, feats.val_split
    scores = knn_scores(
        feats.train, torch.from_numpy(train.labels), feats.val, len(train.classes), k, temperature
    )
    return ValScores(scores, torch.from_numpy(val.labels), len(train.paths), train.classes, feats.image_size)


def linear_feature_scores(feats: SplitFeatures, *, seed: int = 0) -> ValScores:
    """Linear-probe class logits of the val features, the probe fitted on the train features."""
    from lvd.training.linear_probe import fit_linear_probe

    train, val = feats.train_split, feats.val_split
    probe = fit_linear_probe(feats.train, train.labels, len(train.classes), seed=seed)
    return ValScores(
        probe.scores(feats.val),
        torch.from_numpy(val.labels),
        len(train.paths),
        train.classes,
        feats.image_size,
    )


def evaluate_knn(
    backbone: nn.Module,
    data_dir: str | Path,
    *,
    k: int = 20,
    temperature: float = 0.07,
    image_size: int | None = None,
    batch_size: int = 64,
) -> dict[str, float | int]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy on the val split of `data_dir` with
    its train split as the memory bank. Default image size: the backbone's training resolution."""
    v = knn_val_scores(
        backbone, data_dir, k=k, temperature=temperature, image_size=image_size, batch_size=batch_size
    )
    return knn_result(v, k)


def knn_result(v: ValScores, k: int) -> dict[str, float | int]:
    """The figures of a kNN evaluation: top-1 (top-5 with more than 5 classes) and the set's sizes."""
    result: dict[str, float | int] = {
        "top1": v.top1,
        "n_train": v.n_train,
        "n_val": len(v.labels),
        "classes": len(v.classes),
        "k": k,
        "image_size": v.image_size,
    }
    if len(v.classes) > 5:
        top5 = v.scores.topk(5, dim=1).indices
        result["top5"] = float((top5 == v.labels[:, None]).any(1).float().mean())
    return result
