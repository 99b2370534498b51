"""The whole job on a generated pool of a few hundred images: every stage, shards read back, rerun skips."""

import hashlib
import json
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import webdataset as wds

from lvd.jobs.pipeline import STAGE_NAMES, funnel, run_job
from lvd.jobs.shard_verify import verify_shards
from lvd.schemas import layout


@pytest.fixture(scope="module")
def demo_run(demo_job):
    """The session's demo job (conftest.demo_job), shared with the report tests."""
    return demo_job


def test_every_stage_ran_and_wrote_its_marker(demo_run):
    spec, _, first, _ = demo_run
    assert [r.name for r in first] == list(STAGE_NAMES)
    assert not any(r.skipped for r in first)
    for name in STAGE_NAMES:
        marker = json.loads((layout.stage_dir(spec.output_dir, name) / layout.MARKER).read_text())
        assert marker["stage"] == name


def test_shards_hold_every_curated_sample_once_with_original_bytes(demo_run):
    spec, _, _, _ = demo_run
    out = Path(spec.output_dir)
    images = layout.read_table(out, layout.IMAGES)
    sha_by_id = dict(
        zip(images.column("image_id").to_pylist(), images.column("sha256").to_pylist(), strict=True)
    )
    curated = layout.read_table(out, layout.CURATED)
    expected = {}
    for image_id, repeats in zip(
        curated.column("image_id").to_pylist(), curated.column("repeats").to_pylist(), strict=True
    ):
        expected[image_id] = repeats
    index = json.loads((out / "shards" / "index.json").read_text())
    shard_files = sorted((out / "shards").glob("lvd-*.tar"))
    assert [p.name for p in shard_files] == [f"lvd-{i:06d}.tar" for i in range(len(shard_files))]
    seen: dict[int, int] = {}
    keys = set()
    for sample in wds.WebDataset([str(p) for p in shard_files], shardshuffle=False):
        meta = json.loads(sample["json"])
        image_key = next(k for k in sample if k in ("jpg", "png", "webp", "gif", "bmp", "tif", "tiff"))
        assert hashlib.sha256(sample[image_key]).hexdigest() == sha_by_id[int(meta["image_id"])]
        assert sample["__key__"] not in keys
        keys.add(sample["__key__"])
        seen[int(meta["image_id"])] = seen.get(int(meta["image_id"]), 0) + 1
    assert seen == expected
    assert sum(expected.values()) == sum(s["samples"] for s in index["shards"])
    assert verify_shards(out / "shards") == []


def test_bad_inputs_recorded_and_job_completes(demo_run):
    spec, root, _, _ = demo_run
    images = layout.read_table(spec.output_dir, layout.IMAGES)
    errors = images.filter(pc.equal(images.column("status"), "error"))
    planted = json.loads((root / "data" / "manifest.json").read_text())
    assert errors.num_rows >= planted["corrupt"]
    assert all(errors.column("error").to_pylist())  # every error has a reason


def test_funnel_is_consistent(demo_run):
    spec, _, _, _ = demo_run
    f = {label: value for _, label, value in funnel(Path(spec.output_dir))}
    assert f["images in"] > f["- unreadable or corrupt"] > 0
    assert f["- exact duplicates"] > 0 and f["- copies (copy detection)"] > 0
    assert f["= curated images"] > 0 and f["shards written"] > 0
    # Every line follows from the ones above it.
    removed = ("- unreadable or corrupt", "- embed errors", "- exact duplicates", "- copies (copy detection)")
    assert f["= kept pool"] == f["images in"] - sum(f[k] for k in removed) - f["- eval-set overlap"]
    assert f["clustered"] == f["= kept pool"]
    both = f["balanced sample of the kept pool"] + f["+ retrieved by seed sets"] - f["- in both"]
    assert f["= curated images"] == both
    # "in both", from the curated table itself: images with "balanced" and a seed set among their sources.
    sources = layout.read_table(spec.output_dir, layout.CURATED).column("sources").to_pylist()
    assert f["- in both"] == sum("balanced" in s and len(s) > 1 for s in sources)


def test_rerun_skips_every_stage_quickly(demo_run):
    spec, _, first, _ = demo_run
    t0 = time.perf_counter()
    second = run_job(spec)
    second_seconds = time.perf_counter() - t0
    assert all(r.skipped for r in second)
    assert second_seconds < 0.1 * sum(r.seconds for r in first)
    curated = layout.read_table(spec.output_dir, layout.CURATED)
    assert curated.num_rows == len(set(curated.column("image_id").to_pylist()))


def test_sample_retrieval_finds_the_seed_sets_classes(demo_run):
    """Seeds of two generated classes retrieve pool images of those classes (random-feature ViT)."""
    spec, root, _, _ = demo_run
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    images = layout.read_table(spec.output_dir, layout.IMAGES).to_pandas()
    label_of = {
        image_id: manifest["labels"].get(str(Path(uri).relative_to(root / "data")))
        for image_id, uri in zip(images.image_id, images.uri, strict=True)
    }
    retrieved = layout.read_table(spec.output_dir, layout.RETRIEVED).to_pandas()
    for name, seed in manifest["seeds"].items():
        if seed["strategy"] != "sample":
            continue
        got = [label_of[i] for i in retrieved[retrieved.seed_set == name].image_id.unique()]
        precision = sum(label in seed["classes"] for label in got) / len(got)
        pool = [label_of[i] for i in images[images.dataset == "pool"].image_id]
        share = sum(label in seed["classes"] for label in pool) / len(pool)
        # Chance is the classes' share of the pool; a working embed + kNN does far better.
        assert precision >= 3 * share, (name, precision, share)


def test_planted_copies_collapse_and_no_distinct_image_is_dropped(demo_run):
    """With the built-in copy detector: each planted copy pair keeps one image, and every image
    dropped as a copy was dropped for the other image of its planted pair."""
    spec, root, _, _ = demo_run
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    images = layout.read_table(spec.output_dir, layout.IMAGES)
    id_of = {
        str(Path(uri).relative_to(root / "data")): image_id
        for image_id, uri in zip(images["image_id"].to_pylist(), images["uri"].to_pylist(), strict=True)
    }
    dedup = layout.read_table(spec.output_dir, layout.DEDUP).to_pylist()  # ids stay int64
    keep = {row["image_id"]: row["keep"] for row in dedup}
    partner = {}
    for a, b in manifest["near_pairs"]:
        partner[id_of[a]], partner[id_of[b]] = id_of[b], id_of[a]
        assert keep[id_of[a]] != keep[id_of[b]], (a, b)  # exactly one of the pair kept
    copies = [row for row in dedup if row["reason"] == "copy"]
    assert len(copies) == len(manifest["near_pairs"])
    for row in copies:
        assert partner.get(row["image_id"]) == row["duplicate_of"], row
