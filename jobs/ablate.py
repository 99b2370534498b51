"""`lvd ablate`: did curation help? The DINOv2 paper's curated-vs-uncurated comparison (its Table 2).

The same pretraining config, steps, seed and number of images on each arm:
  curated     the job's curated shards;
  dedup_pool  a random sample of the deduplicated pool (what dedup kept, before clustering/retrieval);
  raw_pool    a random sample of the raw pool (every ok pool image, no dedup);
  seeds       the seed sets alone (when the job has any; all their images when fewer than the others).
Each arm is evaluated by kNN and a linear probe on labelled evaluation sets, and the curated arm is
compared with every other arm on the same evaluation images (McNemar). A network at its initial weights is evaluated too,
as the floor every arm should clear.

An arm's images are a curated-like table (the CURATED schema, `sources` = the arm's name) that the job's
own shards stage turns into shards, so every arm is read the same way. The sample is keyed by image id
(`curation.seeded`): a rerun picks the same images, and workers draw for their own parts. To take
exactly n images without the driver holding per-image data, workers return per-part histograms of
their keys (then the keys of the one bin where the n-th falls), and the driver picks the cutoff.

Arms run one after another; each step (table, shards, pretraining, evaluation) writes a marker last
(`layout.ABLATE_MARKER`) naming what it was made from, and a rerun skips the steps whose marker matches.
A pretraining run that was stopped continues from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation import seeded
from lvd.jobs.stage import StageContext
from lvd.jobs.workers import Fanout
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec
from lvd.schemas.tables import CURATED, write_json_atomic, write_parquet_atomic

log = logging.getLogger("lvd")

CURATED_ARM = "curated"
DEDUP_ARM = "dedup_pool"
RAW_ARM = "raw_pool"
SEEDS_ARM = "seeds"
RANDOM_INIT = "random_init"
ARMS = (CURATED_ARM, DEDUP_ARM, RAW_ARM, SEEDS_ARM)
ARM_LABELS = {
    CURATED_ARM: "curated (the job's shards)",
    DEDUP_ARM: "deduplicated pool, random sample",
    RAW_ARM: "raw pool, random sample",
    SEEDS_ARM: "seed sets alone",
    RANDOM_INIT: "initial weights (no pretraining)",
}
# Keys are 64 random bits; the first pass counts them by their top KEY_BIN_BITS.
KEY_BIN_BITS = 16


# ---------------------------------------------------------------- an arm's images: plain functions


def eligible_ids(arm: str, table: pa.Table) -> np.ndarray:
    """The image ids an arm may draw from in one part: `images` rows for raw_pool (ok pool images) and
    seeds (ok seed-set images), `dedup` rows for dedup_pool (the kept ones)."""
    if arm == RAW_ARM:
        mask = pc.and_(pc.equal(table["dataset"], layout.POOL), pc.equal(table["status"], "ok"))
    elif arm == SEEDS_ARM:
        mask = pc.and_(
            pc.starts_with(table["dataset"], layout.seed_dataset("")), pc.equal(table["status"], "ok")
        )
    elif arm == DEDUP_ARM:
        mask = table["keep"]
    else:
        raise ValueError(f"arm {arm!r} does not sample (arms that do: {RAW_ARM}, {DEDUP_ARM}, {SEEDS_ARM})")
    return table["image_id"].filter(mask).to_numpy()


def sample_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """The random key of each image (uint64): an arm takes the images of smallest key."""
    return seeded.keyed_bits(ids, seed, seeded.ABLATE_SAMPLE)


def key_histogram(keys: np.ndarray) -> np.ndarray:
    """Counts of keys by their top KEY_BIN_BITS bits (int64, 2**KEY_BIN_BITS bins)."""
    bins = (keys >> np.uint64(64 - KEY_BIN_BITS)).astype(np.int64)
    return np.bincount(bins, minlength=1 << KEY_BIN_BITS).astype(np.int64)


def keys_in_bin(keys: np.ndarray, bin_index: int) -> np.ndarray:
    return keys[(keys >> np.uint64(64 - KEY_BIN_BITS)) == np.uint64(bin_index)]


def boundary_bin(histogram: np.ndarray, n: int) -> tuple[int, int] | None:
    """(bin holding the n-th smallest key, how many keys of that bin are taken); None when n covers
    every key."""
    if n <= 0:
        raise ValueError("an arm needs at least one image")
    cumulative = np.cumsum(histogram)
    if cumulative[-1] <= n:
        return None
    b = int(np.searchsorted(cumulative, n))  # first bin whose cumulative count reaches n
    before = int(cumulative[b - 1]) if b else 0
    return b, n - before


def cutoff_key(bin_keys: np.ndarray, taken: int) -> int:
    """The largest key taken: the `taken`-th smallest key of the boundary bin."""
    return int(np.sort(bin_keys)[taken - 1])


ALL_KEYS = (1 << 64) - 1


def arm_rows(ids: np.ndarray, seed: int, cutoff: int, arm: str) -> pa.Table:
    """An arm's CURATED rows of one part: the ids whose key is at most `cutoff`, once each, sorted."""
    ids = np.asarray(ids, dtype=np.int64)
    chosen = np.sort(ids[sample_keys(ids, seed) <= np.uint64(cutoff)])
    return pa.table(
        {
            "image_id": pa.array(chosen, pa.int64()),
            "sources": pa.array([[arm]] * len(chosen), pa.list_(pa.string())),
            "repeats": pa.array(np.ones(len(chosen), dtype=np.int32)),
        },
        schema=CURATED,
    )


# ---------------------------------------------------------------- the per-part tasks


def _part_ids(path: str, *, arm: str) -> np.ndarray:
    columns = ["image_id", "keep"] if arm == DEDUP_ARM else ["image_id", "dataset", "status"]
    return eligible_ids(arm, pq.read_table(path, columns=columns))


def _histogram_task(path: str, *, arm: str, seed: int) -> np.ndarray:
    return key_histogram(sample_keys(_part_ids(path, arm=arm), seed))


def _bin_keys_task(path: str, *, arm: str, seed: int, bin_index: int) -> np.ndarray:
    return keys_in_bin(sample_keys(_part_ids(path, arm=arm), seed), bin_index)


def _write_rows_task(item: tuple[int, str], *, arm: str, seed: int, cutoff: int, folder: str) -> int:
    index, path = item
    table = arm_rows(_part_ids(path, arm=arm), seed, cutoff, arm)
    write_parquet_atomic(table, layout.part_path(folder, index), CURATED)
    return table.num_rows


# ---------------------------------------------------------------- markers


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _done(folder: Path, fingerprint: str) -> dict | None:
    """The marker of a finished step made from `fingerprint`, else None."""
    marker = _read_json(folder / layout.ABLATE_MARKER)
    return marker if marker is not None and marker.get("fingerprint") == fingerprint else None


def _stage_marker(out_dir: Path, stage: str) -> str:
    marker = _read_json(layout.stage_dir(out_dir, stage) / layout.MARKER)
    if marker is None:
        raise FileNotFoundError(f"{layout.stage_dir(out_dir, stage)} has no marker: is the job finished?")
    return marker["config_fingerprint"] + ":" + marker["input_fingerprint"]


# ---------------------------------------------------------------- arm drivers


def build_arm_table(out_dir: Path, arm: str, n_images: int, seed: int, fanout: Fanout) -> dict:
    """Write the arm's curated-like table (at most `n_images` images drawn by key from its pool);
    returns its marker {fingerprint, images}. Skipped when its marker matches."""
    source = layout.DEDUP if arm == DEDUP_ARM else layout.IMAGES
    folder = layout.ablate_arm_table_dir(out_dir, arm)
    fingerprint = _fingerprint(
        {"arm": arm, "n": n_images, "seed": seed, "source": _stage_marker(out_dir, source.stage)}
    )
    marker = _done(folder, fingerprint)
    if marker is not None:
        return marker
    shutil.rmtree(folder, ignore_errors=True)
    parts = [str(p) for p in layout.list_parts(layout.table_dir(out_dir, source))]
    histogram = fanout.fold(_histogram_task, parts, np.add, name=f"ablate {arm}: keys", arm=arm, seed=seed)
    boundary = boundary_bin(histogram, n_images) if histogram is not None else None
    if boundary is None:
        cutoff = ALL_KEYS
    else:
        bin_index, taken = boundary
        bin_keys = fanout.map(
            _bin_keys_task, parts, name=f"ablate {arm}: cutoff", arm=arm, seed=seed, bin_index=bin_index
        )
        cutoff = cutoff_key(np.concatenate(bin_keys), taken)
    counts = fanout.map(
        _write_rows_task,
        list(enumerate(parts)),
        name=f"ablate {arm}: table",
        arm=arm,
        seed=seed,
        cutoff=cutoff,
        folder=str(folder),
    )
    marker = {"fingerprint": fingerprint, "images": int(sum(counts)), "pool": int(np.sum(histogram))}
    write_json_atomic(folder / layout.ABLATE_MARKER, marker)
    return marker


@dataclass
class ArmShardsContext(StageContext):
    """The shards stage's context for an arm: it reads the arm's table as CURATED (images and clusters
    from the job) and writes the arm's shard folder."""

    arm: str = ""

    @property
    def stage_dir(self) -> Path:
        return layout.ablate_arm_shards_dir(self.out_dir, self.arm)

    def parts(self, table: layout.Table, model: str | None = None) -> list[Path]:
        if table == layout.CURATED:
            self._check(table, write=False)
            return layout.list_parts(layout.ablate_arm_table_dir(self.out_dir, self.arm))
        return super().parts(table, model)

    def output_dir(self, table: layout.Table) -> Path:
        self._check(table, write=True)
        return self.stage_dir


def build_arm_shards(spec: JobSpec, arm: str, table_marker: dict) -> dict:
    """Run the job's shards stage on the arm's table into the arm's shard folder; returns its marker."""
    from lvd.jobs.stages import shards

    out_dir = Path(spec.output_dir)
    folder = layout.ablate_arm_shards_dir(out_dir, arm)
    fingerprint = _fingerprint(
        {"table": table_marker["fingerprint"], "shards": spec.fingerprint(*shards.STAGE.spec_sections)}
    )
    marker = _done(folder, fingerprint)
    if marker is not None:
        return marker
    (folder / layout.ABLATE_MARKER).unlink(missing_ok=True)
    t0 = time.perf_counter()
    summary = shards.STAGE.run(ArmShardsContext(spec=spec, out_dir=out_dir, stage=shards.STAGE, arm=arm))
    marker = {
        "fingerprint": fingerprint,
        "samples": summary.samples,
        "shards": summary.shards,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(folder / layout.ABLATE_MARKER, marker)
    return marker


def shards_samples(shard_dir: Path) -> int:
    index = _read_json(shard_dir / layout.SHARD_INDEX_JSON)
    if index is None:
        raise FileNotFoundError(f"{shard_dir / layout.SHARD_INDEX_JSON} not found: is the job finished?")
    return int(index["total"]["samples"])


def shards_fingerprint(shard_dir: Path) -> str:
    return hashlib.sha256((shard_dir / layout.SHARD_INDEX_JSON).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- pretraining and evaluation


@dataclass
class AblationSettings:
    """What every arm shares."""

    config: str = "tiny"
    steps: int | None = None  # None: the config's schedule
    seed: int | None = None  # None: the config's train.seed
    batch_size: int | None = None
    eval_sets: list[Path] = field(default_factory=list)
    k: int = 20
    temperature: float = 0.07
    ray_workers: int = 0
    gpu: bool = False
    arms: tuple[str, ...] = ARMS

    def pretrain_config(self):
        from lvd.training.config import load_config

        overrides: dict[str, Any] = {}
        if self.batch_size:
            overrides.setdefault("train", {})["batch_size_per_gpu"] = self.batch_size
        if self.seed is not None:
            overrides.setdefault("train", {})["seed"] = self.seed
        cfg = load_config(self.config, overrides)
        return cfg.with_total_steps(self.steps) if self.steps else cfg


def eval_set_name(path: Path) -> str:
    return Path(path).resolve().name


def pretrain_arm(cfg, shard_dir: Path, out: Path, settings: AblationSettings) -> dict:
    """Pretrain on the arm's shards (continuing a stopped run); returns its marker with the steps,
    images seen and seconds of the run."""
    fingerprint = _fingerprint(
        {"config": cfg.model_dump(mode="json"), "shards": shards_fingerprint(shard_dir)}
    )
    marker = _done(out, fingerprint)
    if marker is not None and marker["finished"]:
        return marker
    if marker is None and out.exists():
        shutil.rmtree(out)  # a run of another config or other shards must not be continued
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / layout.ABLATE_MARKER, {"fingerprint": fingerprint, "finished": False})
    t0 = time.perf_counter()
    if settings.ray_workers:
        from lvd.training.launch import launch_ray_train

        summary = launch_ray_train(
            cfg.model_dump(mode="json"), str(shard_dir), str(out), num_workers=settings.ray_workers,
            use_gpu=settings.gpu,
        )  # fmt: skip
        start, end = summary["steps"]
        images_seen = summary["images_seen"]
        teacher = summary["teacher_export"]
    else:
        from lvd.training.train import pretrain

        result = pretrain(cfg, str(shard_dir), out, resume=True)
        start, end, images_seen = result.start_step, result.end_step, result.images_seen
        teacher = str(result.teacher_export)
    marker = {
        "fingerprint": fingerprint,
        "finished": True,
        "steps": end,
        "resumed_at": start,
        "images_seen": int(images_seen),
        "seconds": round(time.perf_counter() - t0, 3),
        "teacher": teacher,
    }
    write_json_atomic(out / layout.ABLATE_MARKER, marker)
    return marker


PROBES = ("knn", "linear")  # each eval set is scored both ways on the same features


def evaluate(
    backbone_key: str,
    load_backbone: Callable[[], Any],
    out_dir: Path,
    arm: str,
    settings: AblationSettings,
) -> dict[str, dict]:
    """kNN and a linear probe of one backbone on every eval set: per set and probe {top1, correct (per
    validation image, in `images` order)}, with the set's sizes and images; each result file skipped
    when its marker matches."""
    from lvd.training.knn_eval import (
        knn_feature_scores,
        labelled_splits,
        linear_feature_scores,
        split_features,
    )

    results, backbone = {}, None
    for path in settings.eval_sets:
        name = eval_set_name(path)
        train, val = labelled_splits(path)
        files = [str(p.relative_to(path)) for p in (*train.paths, *val.paths)]
        fingerprint = _fingerprint(
            {"backbone": backbone_key, "files": files, "k": settings.k, "t": settings.temperature,
             "probes": PROBES}
        )  # fmt: skip
        result_file = layout.ablate_eval_file(out_dir, arm, name)
        done = _read_json(result_file)
        if done is not None and done.get("fingerprint") == fingerprint:
            results[name] = done
            continue
        backbone = backbone if backbone is not None else load_backbone()
        feats = split_features(backbone, train, val)
        scored = {
            "knn": knn_feature_scores(feats, k=settings.k, temperature=settings.temperature),
            "linear": linear_feature_scores(feats),
        }
        results[name] = {
            "fingerprint": fingerprint,
            "n_train": len(train.paths),
            "n_val": len(val.paths),
            "classes": len(train.classes),
            "images": [str(p.relative_to(path)) for p in val.paths],
            **{probe: {"top1": s.top1, "correct": s.correct.int().tolist()} for probe, s in scored.items()},
        }
        write_json_atomic(result_file, results[name])
    return results


# ---------------------------------------------------------------- the table


def ablation_table(rows: list[dict], eval_sets: Sequence[str]) -> dict:
    """The Table 2 of the run: one row per arm (and the initial weights), kNN and linear-probe top-1 per
    eval set, and per eval set and probe the paired comparison of the curated arm against each other
    row on the same images (`vs_curated`: curated right only, this row right only, McNemar z; z > 0
    favours curated)."""
    from lvd.training.knn_eval import paired_test

    curated = next((r for r in rows if r["arm"] == CURATED_ARM), None)
    out_rows = []
    for row in rows:
        entry = {k: row[k] for k in ("arm", "label", "images", "images_seen", "steps", "seconds")}
        for probe in PROBES:
            entry[f"{probe}_top1"] = {name: row["eval"][name][probe]["top1"] for name in eval_sets}
        entry["vs_curated"] = {probe: {} for probe in PROBES}
        if curated is not None and row is not curated:
            for name in eval_sets:
                a, b = curated["eval"][name], row["eval"][name]
                if a["images"] != b["images"]:
                    raise ValueError(f"eval set {name}: {row['arm']} was evaluated on other images")
                for probe in PROBES:
                    test = paired_test(a[probe]["correct"], b[probe]["correct"])
                    entry["vs_curated"][probe][name] = {
                        "curated_only": test.only_a,
                        "arm_only": test.only_b,
                        "z": round(test.z, 3),
                    }
        out_rows.append(entry)
    return {
        "eval_sets": {name: {"n_val": rows[0]["eval"][name]["n_val"]} for name in eval_sets},
        "probes": list(PROBES),
        "rows": out_rows,
    }


def format_markdown(table: dict) -> str:
    """The table as markdown: one row per arm; per eval set and probe a top-1 column and a paired-z
    column."""
    names = list(table["eval_sets"])
    probe_label = {"knn": "kNN", "linear": "linear"}
    header = ["arm", "images", "images seen", "steps", "seconds"]
    for name in names:
        n_val = table["eval_sets"][name]["n_val"]
        for probe in PROBES:
            header += [
                f"{probe_label[probe]} top-1 {name} ({n_val} val)",
                f"z vs curated ({probe_label[probe]})",
            ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [
            f"{row['arm']}: {row['label']}",
            "-" if row["images"] is None else str(row["images"]),
            str(row["images_seen"]),
            str(row["steps"]),
            f"{row['seconds']:.0f}",
        ]
        for name in names:
            for probe in PROBES:
                cells.append(f"{100 * row[f'{probe}_top1'][name]:.1f}")
                paired = row["vs_curated"][probe].get(name)
                cells.append(
                    "-" if paired is None
                    else f"{paired['z']:+.2f} ({paired['curated_only']} vs {paired['arm_only']})"
                )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{arm}: left out, {reason}." for arm, reason in table.get("left_out", {}).items()]
    lines.append(
        "z: McNemar on the same validation images, (curated right only - arm right only) / sqrt(sum); "
        "z > 0 favours curated, |z| > 2 is beyond noise. In brackets: images right only for curated vs "
        "only for the arm. kNN: weighted 20-NN on the frozen features; linear: logistic regression on "
        "them, its L2 weight chosen on held-out training images."
    )
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, table: dict) -> tuple[Path, Path]:
    folder = layout.ablate_dir(out_dir)
    json_path, md_path = folder / layout.ABLATION_JSON, folder / layout.ABLATION_MD
    write_json_atomic(json_path, table)
    tmp = layout.temp_path(md_path)
    tmp.write_text(format_markdown(table))
    tmp.replace(md_path)
    return json_path, md_path


# ---------------------------------------------------------------- the whole ablation


def run_ablation(spec: JobSpec, settings: AblationSettings, fanout: Fanout) -> dict:
    """Every arm in turn (table, shards, pretraining, evaluation), then the table (written last)."""
    import torch

    from lvd.training.knn_eval import load_eval_backbone
    from lvd.training.meta_arch import SSLMetaArch

    if not settings.eval_sets:
        raise ValueError("give at least one evaluation set")
    out_dir = Path(spec.output_dir)
    curated_shards = layout.shards_dir(out_dir)
    n_images = shards_samples(curated_shards)
    cfg = settings.pretrain_config()
    names = [eval_set_name(p) for p in settings.eval_sets]
    if len(set(names)) < len(names):
        raise ValueError(
            f"evaluation sets need distinct folder names (their results are named by them): {names}"
        )
    rows, left_out = [], {}
    if SEEDS_ARM in settings.arms and not spec.seeds:
        left_out[SEEDS_ARM] = "the job has no seed sets"
    arms = [a for a in settings.arms if a not in left_out]

    def initial_backbone():
        torch.manual_seed(cfg.train.seed)  # the initial weights every arm starts from
        return SSLMetaArch(cfg).teacher.backbone.eval()

    init_key = _fingerprint({"initial": cfg.model_dump(mode="json")})
    rows.append(
        {"arm": RANDOM_INIT, "label": ARM_LABELS[RANDOM_INIT], "images": None, "images_seen": 0, "steps": 0,
         "seconds": 0.0, "eval": evaluate(init_key, initial_backbone, out_dir, RANDOM_INIT, settings)}
    )  # fmt: skip
    for arm in arms:
        log.info("ablate: arm %s", arm)
        if arm == CURATED_ARM:
            shard_dir, images = curated_shards, n_images
        else:
            table = build_arm_table(out_dir, arm, n_images, cfg.train.seed, fanout)
            if table["images"] == 0:
                left_out[arm] = "no images to draw from"
                log.warning("ablate: arm %s left out: %s", arm, left_out[arm])
                continue
            shards_marker = build_arm_shards(spec, arm, table)
            shard_dir, images = layout.ablate_arm_shards_dir(out_dir, arm), shards_marker["samples"]
        run = pretrain_arm(cfg, shard_dir, layout.ablate_pretrain_dir(out_dir, arm), settings)
        results = evaluate(
            run["fingerprint"], lambda run=run: load_eval_backbone(run["teacher"]), out_dir, arm, settings
        )
        rows.append(
            {"arm": arm, "label": ARM_LABELS[arm], "images": images, "images_seen": run["images_seen"],
             "steps": run["steps"], "seconds": run["seconds"], "eval": results}
        )  # fmt: skip
        log.info(
            "ablate: arm %s: top-1 %s",
            arm,
            {n: {p: round(r[p]["top1"], 4) for p in PROBES} for n, r in results.items()},
        )
    rows = [r for r in rows if r["arm"] != RANDOM_INIT] + [rows[0]]
    table = ablation_table(rows, names)
    table["left_out"] = left_out
    table["settings"] = {
        "config": settings.config,
        "steps": cfg.total_steps,
        "seed": cfg.train.seed,
        "batch_size": cfg.train.batch_size_per_gpu,
        "images": n_images,
        "k": settings.k,
        "temperature": settings.temperature,
        "eval_sets": {n: str(Path(p).resolve()) for n, p in zip(names, settings.eval_sets, strict=True)},
    }
    write_table(out_dir, table)
    return table
