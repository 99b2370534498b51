"""`lvd ablate`: the arms' keyed samples (plain functions), the paired table, and the command end to end
on a small generated pool with a few training steps."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from lvd.jobs import ablate
from lvd.jobs.ablation_demo import EVAL_SET, RARE_CLASSES, SEED_SET, build_ablation_demo
from lvd.schemas import layout
from lvd.schemas.tables import CURATED, read_parts
from lvd.training.config import CONFIG_DIR

# ---------------------------------------------------------------- the keyed sample


def _sample(parts: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """What build_arm_table does over parts, in this process."""
    keys = [ablate.sample_keys(p, seed) for p in parts]
    histogram = np.sum([ablate.key_histogram(k) for k in keys], axis=0)
    boundary = ablate.boundary_bin(histogram, n)
    if boundary is None:
        cutoff = ablate.ALL_KEYS
    else:
        b, taken = boundary
        cutoff = ablate.cutoff_key(np.concatenate([ablate.keys_in_bin(k, b) for k in keys]), taken)
    rows = [ablate.arm_rows(p, seed, cutoff, "raw_pool") for p in parts]
    return np.concatenate([r["image_id"].to_numpy() for r in rows])


def test_sample_takes_exactly_n_images_the_same_whatever_the_parts():
    rng = np.random.default_rng(0)
    ids = rng.choice(1 << 40, size=5000, replace=False).astype(np.int64)
    whole = _sample([ids], 1234, seed=7)
    assert len(whole) == 1234 and len(np.unique(whole)) == 1234
    split = _sample(np.array_split(rng.permutation(ids), 7), 1234, seed=7)
    assert set(split) == set(whole)
    # The n smallest keys, checked by sorting all of them.
    expected = ids[np.argsort(ablate.sample_keys(ids, 7))[:1234]]
    assert set(whole) == set(expected)
    assert set(_sample([ids], 1234, seed=8)) != set(whole)


def test_sample_of_more_than_the_pool_takes_all_of_it():
    ids = np.arange(100, 160, dtype=np.int64)
    assert sorted(_sample([ids[:25], ids[25:]], 1000, seed=0)) == list(ids)


def test_eligible_ids_by_arm():
    images = pa.table(
        {
            "image_id": [1, 2, 3, 4, 5],
            "dataset": ["pool", "pool", "seed:a", "eval:x", "seed:b"],
            "status": ["ok", "error", "ok", "ok", "ok"],
        }
    )
    dedup = pa.table({"image_id": [1, 6, 7], "keep": [True, False, True]})
    assert list(ablate.eligible_ids("raw_pool", images)) == [1]
    assert list(ablate.eligible_ids("seeds", images)) == [3, 5]
    assert list(ablate.eligible_ids("dedup_pool", dedup)) == [1, 7]
    with pytest.raises(ValueError, match="does not sample"):
        ablate.eligible_ids("curated", images)


# ---------------------------------------------------------------- the table


def _row(arm: str, correct: list[int], linear: list[int] | None = None) -> dict:
    linear = correct if linear is None else linear
    return {
        "arm": arm,
        "label": arm,
        "images": 10,
        "images_seen": 40,
        "steps": 5,
        "seconds": 1.0,
        "eval": {"e": {"n_val": len(correct), "images": [f"v{i}.jpg" for i in range(len(correct))],
                       "knn": {"top1": float(np.mean(correct)), "correct": correct},
                       "linear": {"top1": float(np.mean(linear)), "correct": linear}}},
    }  # fmt: skip


def test_table_pairs_curated_with_every_other_arm():
    curated = [1, 1, 1, 1, 0, 1, 0, 1]
    other = [0, 0, 1, 1, 1, 0, 0, 1]  # curated alone right on 3 images, the other alone on 1
    linear_other = [1, 0, 0, 0, 1, 0, 1, 0]  # the linear probe: curated alone right on 5, the other on 2
    rows = [_row("curated", curated), _row("raw_pool", other, linear_other)]
    table = ablate.ablation_table(rows, ["e"])
    assert [r["arm"] for r in table["rows"]] == ["curated", "raw_pool"]
    assert table["rows"][0]["vs_curated"] == {"knn": {}, "linear": {}}
    paired = table["rows"][1]["vs_curated"]["knn"]["e"]
    assert (paired["curated_only"], paired["arm_only"]) == (3, 1)
    assert paired["z"] == pytest.approx(2 / 2.0)
    linear = table["rows"][1]["vs_curated"]["linear"]["e"]
    assert (linear["curated_only"], linear["arm_only"]) == (5, 2)
    assert linear["z"] == pytest.approx(3 / 7**0.5, abs=1e-3)
    assert table["rows"][1]["linear_top1"]["e"] == pytest.approx(3 / 8)
    md = ablate.format_markdown(table)
    assert md.count("\n| ") == 2 and "+1.00 (3 vs 1)" in md and "+1.13 (5 vs 2)" in md


def test_table_refuses_results_on_other_images():
    other = _row("raw_pool", [1, 0])
    other["eval"]["e"]["images"] = ["w0.jpg", "w1.jpg"]
    with pytest.raises(ValueError, match="other images"):
        ablate.ablation_table([_row("curated", [1, 1]), other], ["e"])


# ---------------------------------------------------------------- the generated pool


def test_ablation_pool_plants_what_its_manifest_says(tmp_path):
    from lvd.schemas.job_spec import load_job_spec

    spec = load_job_spec(build_ablation_demo(tmp_path, n_images=100, eval_per_class=2, seeds_per_class=2))
    data = tmp_path / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    pool = sorted((data / "pool").iterdir())
    assert len(pool) == 100 == len(manifest["pool"]["roles"])
    roles, labels = manifest["pool"]["roles"], manifest["pool"]["labels"]
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pool}
    unique = {digest[Path(n).name] for n, r in roles.items() if r == "unique"}
    exact = [n for n, r in roles.items() if r == "exact"]
    assert len(exact) + sum(r == "near" for r in roles.values()) == 40  # DUPLICATE_SHARE of the pool
    assert all(digest[Path(n).name] in unique for n in exact)  # byte copies of pool images
    assert sum(r == "eval_leak" for r in roles.values()) == 10
    unique_labels = [labels[n] for n, r in roles.items() if r == "unique"]
    assert sum(label in RARE_CLASSES for label in unique_labels) < 0.15 * len(unique_labels)
    assert len(list((data / "seeds" / SEED_SET).iterdir())) == 2 * len(RARE_CLASSES)
    for split in ("train", "val"):
        assert len(list((data / "eval" / EVAL_SET / split).rglob("*.jpg"))) == 2 * 8
    assert [s.name for s in spec.seeds] == [SEED_SET] and Path(spec.embedding.retrieval.weights).exists()


def test_texture_stand_in_puts_a_class_together():
    import torch

    from lvd.embeddings.preprocess import PreprocessConfig, normalize, prepare_image
    from lvd.jobs.ablation_demo import TextureFeatures
    from lvd.jobs.demo import encode, generate_image

    rng = np.random.default_rng(5)
    cfg = PreprocessConfig(resize_size=128, image_size=112, patch_size=1)
    labels = np.repeat(np.arange(8), 10)

    def features() -> torch.Tensor:
        crops = [prepare_image(encode(generate_image(rng, int(c), "grey"), "jpeg"), cfg) for c in labels]
        return TextureFeatures()(normalize(torch.as_tensor(np.stack(crops))))

    bank, queries = features(), features()
    nearest = (queries @ bank.T).argmax(1).numpy()
    assert (labels[nearest] == labels).mean() > 0.4  # chance is 1/8


# ---------------------------------------------------------------- `lvd ablate` end to end

STEPS, BATCH = 2, 8
ROW_ARMS = ["curated", "dedup_pool", "raw_pool", "seeds", "random_init"]


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, ray_local):
    from lvd.jobs.cli import app
    from lvd.jobs.pipeline import run_job
    from lvd.schemas.job_spec import load_job_spec

    root = tmp_path_factory.mktemp("ablate")
    spec = load_job_spec(build_ablation_demo(root, n_images=100, eval_per_class=3, seeds_per_class=3))
    run_job(spec)
    # The tiny config without loader processes, with fewer crops and one thread: the suite shares 2 cores.
    config = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    config["train"].update(num_workers=0, augment_threads=1, shuffle_buffer=16)
    config["crops"]["local_crops_number"] = 2
    config["compute"] = {"threads": 1}
    (root / "test.yaml").write_text(yaml.safe_dump(config))
    args = ["ablate", spec.output_dir, "--eval", str(root / "data" / "eval" / EVAL_SET)]
    args += ["--config", str(root / "test.yaml"), "--steps", str(STEPS), "--batch-size", str(BATCH)]
    # Not --quiet: it turns progress lines off for the process, and later test modules count them.
    levels = {name: logging.getLogger(name).level for name in ("", "lvd")}
    try:
        first = CliRunner().invoke(app, args)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return Path(spec.output_dir), first, args


def test_ablate_prints_and_writes_the_table(ablated):
    out, first, _ = ablated
    assert first.exit_code == 0, first.output
    table = json.loads((out / "ablate" / "ablation.json").read_text())
    assert [r["arm"] for r in table["rows"]] == ROW_ARMS
    md = (out / "ablate" / "ablation.md").read_text()
    assert md in first.output
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(ROW_ARMS)
    for row in table["rows"]:
        assert set(row["knn_top1"]) == set(row["linear_top1"]) == {EVAL_SET}
        if row["arm"] not in ("curated",):
            for probe in ("knn", "linear"):
                paired = row["vs_curated"][probe][EVAL_SET]
                assert paired["curated_only"] + paired["arm_only"] <= table["eval_sets"][EVAL_SET]["n_val"]
        if row["arm"] != "random_init":
            assert row["steps"] == STEPS and row["images_seen"] == STEPS * BATCH


def _shard_image_ids(shard_dir: Path) -> list[int]:
    ids: list[int] = []
    for path in sorted(shard_dir.glob("lvd-*.parquet")):
        ids += pq.read_table(path, columns=["image_id"])["image_id"].to_pylist()
    return ids


def test_every_arm_read_the_images_it_was_given(ablated):
    out, _, _ = ablated
    table = json.loads((out / "ablate" / "ablation.json").read_text())
    rows = {r["arm"]: r for r in table["rows"]}
    curated_ids = layout.read_table(out, layout.CURATED)["image_id"].to_pylist()
    n = len(curated_ids)
    assert rows["curated"]["images"] == n == table["settings"]["images"]
    images = layout.read_table(out, layout.IMAGES)
    dataset = dict(zip(images["image_id"].to_pylist(), images["dataset"].to_pylist(), strict=True))
    kept = set(layout.read_table(out, layout.DEDUP).filter(pa.compute.field("keep"))["image_id"].to_pylist())
    seeds = {i for i, d in dataset.items() if d == layout.seed_dataset(SEED_SET)}
    assert len(seeds) == 3 * len(RARE_CLASSES) < n  # the seeds arm has fewer images than the others
    expected = {"dedup_pool": (n, kept), "raw_pool": (n, {i for i, d in dataset.items() if d == "pool"}),
                "seeds": (len(seeds), seeds)}  # fmt: skip
    for arm, (count, allowed) in expected.items():
        shard_ids = _shard_image_ids(out / "ablate" / arm / "shards")
        arm_ids = read_parts(layout.list_parts(layout.ablate_arm_table_dir(out, arm)), CURATED)
        assert rows[arm]["images"] == count
        assert len(shard_ids) == len(set(shard_ids)) == count
        assert set(shard_ids) == set(arm_ids["image_id"].to_pylist()) and set(shard_ids) <= allowed
    assert sorted(_shard_image_ids(out / "shards")) == sorted(curated_ids)


def test_rerun_skips_every_arm_and_gives_the_same_table(ablated):
    from lvd.jobs.cli import app

    out, _, args = ablated
    before = json.loads((out / "ablate" / "ablation.json").read_text())
    marker = out / "ablate" / "raw_pool" / "pretrain" / layout.ABLATE_MARKER
    stamp = marker.stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "ablate" / "ablation.json").read_text()) == before
    assert marker.stat().st_mtime_ns == stamp
