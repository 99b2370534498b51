"""The demo generator: deterministic, a valid job spec, and planted content as the manifest says,
checked by scanning the written files independently of the generator."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvd.curation.ingest import check_sources
from lvd.embeddings import copy_descriptor
from lvd.embeddings.models import load_embedding_model
from lvd.embeddings.preprocess import prepare_image
from lvd.jobs.demo import CLASS_NAMES, build_demo, build_labelled_folder
from lvd.schemas.job_spec import load_job_spec

N_IMAGES = 120
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo(root, n_images=N_IMAGES, seed=3)
    return root


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def scan_pool(data: Path) -> dict[str, bytes]:
    """Every pool image by uri (relative to data/), read with tarfile/pyarrow, not with lvd code."""
    found = {}
    for p in sorted((data / "pool" / "folder").rglob("*")):
        if p.is_file():
            found[p.relative_to(data).as_posix()] = p.read_bytes()
    for tar_path in sorted((data / "pool").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(IMAGE_EXTS):
                    found[f"pool/{tar_path.name}#{m.name}"] = tar.extractfile(m).read()
    for pq_path in sorted((data / "pool").glob("*.parquet")):
        for row, value in enumerate(pq.read_table(pq_path, columns=["image"]).column(0).to_pylist()):
            found[f"pool/{pq_path.name}#row={row}"] = value
    return found


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:
                return False
            img.load()
        return True
    except Exception:
        return False


def test_build_is_deterministic_and_reused(demo, tmp_path):
    other = tmp_path / "again"
    build_demo(other, n_images=N_IMAGES, seed=3)
    assert _files(other) == _files(demo)
    stamp = (other / "data" / "manifest.json").stat().st_mtime_ns
    build_demo(other, n_images=N_IMAGES, seed=3)  # same parameters: nothing rewritten
    assert (other / "data" / "manifest.json").stat().st_mtime_ns == stamp


def test_job_spec_validates_and_points_at_the_data(demo):
    spec = load_job_spec(demo / "job.yaml")
    assert Path(spec.output_dir) == (demo / "output").resolve()
    check_sources(spec.pool)
    for s in [*spec.seeds, *spec.eval_sets]:
        check_sources(s.sources)
    assert {s.strategy for s in spec.seeds} == {"sample", "cluster", "as_is"}
    assert spec.embedding.copy_detection.arch == "copy_descriptor"
    assert spec.dedup.threshold == copy_descriptor.THRESHOLD
    assert spec.embedding.retrieval.random_init and spec.embedding.retrieval.image_size == 70
    assert [lv.k for lv in spec.clustering.levels] == [24, 6]
    assert spec.ray.num_cpus == 2 and spec.spark.master == "local[2]"


def test_planted_counts_match_an_independent_scan(demo):
    data = demo / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    pool = scan_pool(data)
    assert len(pool) == manifest["pool_files"] == N_IMAGES
    containers = Counter("tar" if ".tar#" in u else "parquet" if ".parquet#" in u else "folder" for u in pool)
    assert dict(containers) == manifest["containers"]
    assert all(containers[k] > 0 for k in ("folder", "tar", "parquet"))

    by_hash = Counter(hashlib.sha256(b).hexdigest() for b in pool.values() if b)
    assert sum(n - 1 for n in by_hash.values()) == manifest["exact_duplicates"] > 0
    for copy, original in manifest["exact_pairs"]:
        assert pool[copy] == pool[original] and copy != original

    undecodable = {u for u, b in pool.items() if not decodes(b)}
    assert undecodable == set(manifest["bad"]) and len(undecodable) == manifest["corrupt"] == 5
    modes = Counter(Image.open(io.BytesIO(b)).mode for u, b in pool.items() if u not in undecodable)
    assert modes["CMYK"] >= 1 and modes["I;16"] >= 1

    assert set(manifest["labels"]) == set(pool) - undecodable
    assert Counter(manifest["labels"].values()).keys() <= set(range(len(CLASS_NAMES)))
    for name, info in manifest["seeds"].items():
        assert len(list((data / "seeds" / name).iterdir())) == info["count"]
    assert len(list((data / "eval" / "holdout").iterdir())) == manifest["eval"]["holdout"] == 10


def test_copy_descriptor_separates_planted_copies_from_distinct_images(demo):
    """At the threshold the demo's dedup uses, every planted copy (and eval-set copy) is above it
    and every pair of distinct pool images below it, through the embed stage's decoding."""
    data = demo / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    spec = load_job_spec(demo / "job.yaml")
    model = load_embedding_model(spec.embedding.copy_detection, "cpu")
    pool = scan_pool(data)
    uris = sorted(manifest["labels"])

    def embed(blobs: list[bytes]) -> np.ndarray:
        return model.embed_uint8(np.stack([prepare_image(b, model.preprocess) for b in blobs]))

    vectors = embed([pool[u] for u in uris])
    evals = embed([(data / e).read_bytes() for e, _ in manifest["eval_pairs"]])
    index = {u: i for i, u in enumerate(uris)}
    sim = vectors @ vectors.T
    copies = np.eye(len(uris), dtype=bool)
    for a, b in manifest["exact_pairs"] + manifest["near_pairs"]:
        copies[index[a], index[b]] = copies[index[b], index[a]] = True
    threshold, eval_threshold = spec.dedup.threshold, spec.dedup.eval_threshold
    assert min(sim[index[a], index[b]] for a, b in manifest["near_pairs"]) > threshold
    assert sim[~copies].max() < threshold
    assert min(float(evals[k] @ vectors[index[p]]) for k, (_, p) in enumerate(manifest["eval_pairs"])) > (
        eval_threshold
    )


def test_labelled_folder(tmp_path):
    out = build_labelled_folder(tmp_path / "lab", n_per_class=2, seed=0, val_per_class=1)
    for split, n in (("train", 2), ("val", 1)):
        classes = sorted(p.name for p in (out / split).iterdir())
        assert classes == sorted(CLASS_NAMES)
        for c in classes:
            files = sorted((out / split / c).glob("*.png"))
            assert len(files) == n and all(decodes(f.read_bytes()) for f in files)


def _hue_histogram(img: Image.Image) -> np.ndarray:
    hsv = np.asarray(img.convert("HSV"), dtype=np.float64)
    weight = hsv[..., 1] * hsv[..., 2]  # grey pixels carry no hue
    hist = np.bincount((hsv[..., 0] // 16).astype(int).ravel(), weight.ravel(), minlength=16)
    return hist / hist.sum()


@pytest.mark.parametrize("colours", ["class", "random"])
def test_colours_decide_whether_hue_tells_the_class(colours):
    """A 1-nearest-neighbour classifier on hue histograms: near-perfect with class hues, near chance
    (1/8) with random hues, where only the pattern tells the classes apart."""
    from lvd.jobs.demo import generate_image

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(len(CLASS_NAMES)), 12)
    feats = np.stack([_hue_histogram(generate_image(rng, int(c), colours)) for c in labels])
    dist = np.abs(feats[:, None] - feats[None]).sum(-1)
    np.fill_diagonal(dist, np.inf)
    accuracy = float((labels[dist.argmin(1)] == labels).mean())
    if colours == "class":
        assert accuracy > 0.9
    else:
        assert accuracy < 0.4


def test_grey_images_have_no_colour_and_bad_choice_is_refused():
    from lvd.jobs.demo import generate_image

    rng = np.random.default_rng(6)
    for label in range(len(CLASS_NAMES)):
        rgb = np.asarray(generate_image(rng, label, "grey"), dtype=np.int16)
        assert rgb.std() > 10  # a pattern, not a flat image
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    with pytest.raises(ValueError, match="colours"):
        generate_image(rng, 0, "sepia")
