"""A generated pool where curation has something to fix, for `lvd ablate` (`lvd demo --ablation`).

`build_ablation_demo(out)` writes, deterministically for a given (n_images, seed):
  out/data/pool/img-NNNNN.jpg        the uncurated pool (flat: no labels in the paths)
  out/data/seeds/rare_classes/       a seed set of the rare classes
  out/data/eval/textures/{train,val}/<class>/   a labelled, class-balanced evaluation set
  out/data/texture_features.pt       a TorchScript stand-in for a pretrained retrieval model
  out/data/copy_detection.pt         the demo's TorchScript stand-in for SSCD
  out/data/manifest.json             labels and roles of the pool files (written last)
  out/job.yaml                       the job spec (paths relative to out/)

Every image is grey (the demo's class generators with `colours="grey"`): only patterns tell classes
apart, which the tiny pretraining config can learn on a CPU, and which an untrained network does not
already separate (it would by colour). What curation can fix, planted in the pool:
- a long tail: `CLASS_WEIGHTS`, three classes (`RARE_CLASSES`) at 1-4% of the unique images;
- heavy duplication: `DUPLICATE_SHARE` of the pool are exact or near copies of a few head-class images;
- an eval-set leak: a near copy of every validation image of the eval set;
- seed sets for the rare classes (other images of those classes than the pool's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from lvd.jobs.demo import (
    CLASS_NAMES,
    already_built,
    encode,
    generate_image,
    near_duplicate,
    write_copy_detection_model,
)

GENERATOR_VERSION = 1
MIN_IMAGES = 100

# Unique images per class (by class index, CLASS_NAMES order): blobs, rings and sunburst dominate,
# checker, polygons and grid are the tail.
CLASS_WEIGHTS = np.array([0.12, 0.09, 0.04, 0.22, 0.02, 0.30, 0.01, 0.20])
RARE_CLASSES = (2, 4, 6)
DUPLICATE_SHARE = 0.4  # of the pool: copies of a few popular head-class images
POPULAR_SHARE = 0.01  # of the pool: the popular images those copies are of
SEED_SET = "rare_classes"
EVAL_SET = "textures"
RETRIEVAL_IMAGE_SIZE = 112


class TextureFeatures(torch.nn.Module):
    """(B,3,H,W) normalised images -> (B,dim) L2-normalised texture descriptors: the grey image's
    windowed power spectrum, pooled into log-spaced radial bins (the log profile, centred) and, per
    radial band, the size of its first orientation harmonics (how anisotropic the band is, whatever
    the orientation). A stand-in for a pretrained retrieval model (none can be downloaded here): it
    places images of a generated class near each other, so clusters and seed retrieval follow the
    classes as a real model's would for photos."""

    def __init__(
        self, size: int = RETRIEVAL_IMAGE_SIZE, radial: int = 12, bands: int = 4, harmonics: int = 4
    ):
        super().__init__()
        fy, fx = torch.meshgrid(torch.fft.fftfreq(size), torch.fft.fftfreq(size), indexing="ij")
        radius, theta = torch.sqrt(fy**2 + fx**2), torch.atan2(fy, fx)

        def bins(n: int) -> torch.Tensor:
            edges = torch.logspace(float(np.log10(1.5 / size)), float(np.log10(0.5)), n + 1)
            index = torch.bucketize(radius, edges) - 1
            inside = (index >= 0) & (index < n)
            return F.one_hot(index.clamp(0, n - 1), n).float() * inside[..., None]

        band = bins(bands)
        k = torch.arange(1, harmonics + 1, dtype=torch.float32)
        cos = (band[..., :, None] * torch.cos(2 * theta[..., None, None] * k)).reshape(size * size, -1)
        sin = (band[..., :, None] * torch.sin(2 * theta[..., None, None] * k)).reshape(size * size, -1)
        window = torch.hann_window(size, periodic=False)
        self.size, self.bands, self.harmonics = size, bands, harmonics
        self.register_buffer("radial_weights", bins(radial).reshape(size * size, radial))
        self.register_buffer("band_weights", band.reshape(size * size, bands))
        self.register_buffer("cos_weights", cos)
        self.register_buffer("sin_weights", sin)
        self.register_buffer("window", window[:, None] * window[None, :])
        self.register_buffer("grey", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = (x.float() * self.grey).sum(dim=1, keepdim=True)
        grey = F.interpolate(grey, size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]
        grey = (grey - grey.mean(dim=(1, 2), keepdim=True)) * self.window
        power = torch.fft.fft2(grey).abs().pow(2).flatten(1)
        power = power / power.sum(dim=1, keepdim=True).clamp_min(1e-12)
        profile = torch.log(power @ self.radial_weights + 1e-6)
        profile = profile - profile.mean(dim=1, keepdim=True)
        in_band = (power @ self.band_weights).clamp_min(1e-9)
        c = (power @ self.cos_weights).view(-1, self.bands, self.harmonics)
        s = (power @ self.sin_weights).view(-1, self.bands, self.harmonics)
        anisotropy = torch.sqrt(c**2 + s**2) / in_band[..., None]
        return F.normalize(torch.cat([profile / 3.0, anisotropy.flatten(1) * 2.0], dim=1), dim=1)


def write_texture_model(path: Path) -> None:
    scripted = torch.jit.script(TextureFeatures().eval())
    tmp = path.with_name(f".{path.name}.tmp")
    torch.jit.save(scripted, str(tmp))
    os.replace(tmp, path)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _grey_jpeg(rng: np.random.Generator, label: int) -> bytes:
    return encode(generate_image(rng, label, "grey"), "jpeg", 90)


def _job_spec(n_images: int, curated_target: int) -> dict:
    return {
        "name": "lvd-ablation-demo",
        "output_dir": "output",
        "pool": [{"uri": "data/pool"}],
        "seeds": [
            {"name": SEED_SET, "strategy": "sample", "k": 8, "sources": [{"uri": f"data/seeds/{SEED_SET}"}]}
        ],
        "eval_sets": [{"name": EVAL_SET, "sources": [{"uri": f"data/eval/{EVAL_SET}"}]}],
        "ingest": {"files_per_part": max(64, n_images // 8)},
        "embedding": {
            "retrieval": {
                "arch": "torchscript",
                "weights": "data/texture_features.pt",
                "image_size": RETRIEVAL_IMAGE_SIZE,
                "resize_size": 128,
            },
            "copy_detection": {
                "arch": "torchscript",
                "weights": "data/copy_detection.pt",
                "image_size": 112,
                "resize_size": 128,
            },
        },
        "dedup": {"k": 16, "exact_below": 1_000_000},
        "retrieval": {"exact_below": 1_000_000},
        "clustering": {"levels": [{"k": 32}, {"k": 8, "resampling_steps": 2}]},
        "sampling": {"target_size": curated_target},
        "shards": {"samples_per_shard": 128},
        "ray": {"num_cpus": 2},
        "spark": {"master": "local[2]", "driver_memory": "2g", "executor_memory": "2g"},
    }


def build_ablation_demo(
    out: Path, n_images: int = 2400, seed: int = 0, eval_per_class: int = 40, seeds_per_class: int = 40
) -> Path:
    """Generate the pool, seed set and eval set under `out/data/` and write `out/job.yaml`.

    `n_images` is the pool size (the eval leak included). Deterministic for its parameters; already
    built with the same ones: nothing is rewritten. Returns the job spec's path.
    """
    if n_images < MIN_IMAGES:
        raise ValueError(f"n_images={n_images}: the ablation pool needs at least {MIN_IMAGES}")
    out = Path(out)
    data_dir, job_path = out / "data", out / "job.yaml"
    params = {
        "version": GENERATOR_VERSION,
        "n_images": n_images,
        "seed": seed,
        "eval_per_class": eval_per_class,
        "seeds_per_class": seeds_per_class,
    }
    manifest_path = data_dir / "manifest.json"
    if already_built(out, params):
        return job_path
    rng = np.random.default_rng([seed, 0xAB1A7E])

    # Eval set first: the pool leaks a near copy of each of its validation images.
    eval_val: list[tuple[bytes, int]] = []
    for split in ("train", "val"):
        for label, name in enumerate(CLASS_NAMES):
            for j in range(eval_per_class):
                data = _grey_jpeg(rng, label)
                _write(data_dir / "eval" / EVAL_SET / split / name / f"{j:04d}.jpg", data)
                if split == "val":
                    eval_val.append((data, label))
    for j in range(seeds_per_class * len(RARE_CLASSES)):
        label = RARE_CLASSES[j % len(RARE_CLASSES)]
        _write(data_dir / "seeds" / SEED_SET / f"{j:04d}.jpg", _grey_jpeg(rng, label))

    n_leak = min(len(eval_val), n_images // 10)
    n_copies = int(DUPLICATE_SHARE * n_images)
    n_popular = max(2, int(POPULAR_SHARE * n_images))
    n_unique = n_images - n_leak - n_copies
    items: list[dict] = []
    for label in rng.choice(len(CLASS_NAMES), size=n_unique, p=CLASS_WEIGHTS):
        items.append({"data": _grey_jpeg(rng, int(label)), "label": int(label), "role": "unique"})
    head = [i for i, it in enumerate(items) if it["label"] not in RARE_CLASSES]
    popular = rng.choice(head, size=min(n_popular, len(head)), replace=False)
    for j in range(n_copies):
        src = items[int(popular[j % len(popular)])]
        data = src["data"] if j % 2 == 0 else near_duplicate(rng, src["data"])
        items.append({"data": data, "label": src["label"], "role": "exact" if j % 2 == 0 else "near"})
    for j in rng.choice(len(eval_val), size=n_leak, replace=False):
        data, label = eval_val[int(j)]
        items.append({"data": near_duplicate(rng, data), "label": label, "role": "eval_leak"})
    order = rng.permutation(len(items))
    labels, roles = {}, {}
    for position, i in enumerate(order):
        name = f"pool/img-{position:05d}.jpg"
        _write(data_dir / name, items[int(i)]["data"])
        labels[name], roles[name] = items[int(i)]["label"], items[int(i)]["role"]

    write_texture_model(data_dir / "texture_features.pt")
    write_copy_detection_model(data_dir / "copy_detection.pt", seed)
    curated_target = max(32, n_unique // 3)
    job_path.write_text(yaml.safe_dump(_job_spec(n_images, curated_target), sort_keys=False))
    manifest = {
        "params": params,
        "classes": list(CLASS_NAMES),
        "rare_classes": [CLASS_NAMES[c] for c in RARE_CLASSES],
        "pool": {"labels": labels, "roles": roles},
        "counts": {role: sum(r == role for r in roles.values()) for role in sorted(set(roles.values()))},
    }
    tmp = manifest_path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, manifest_path)
    return job_path
