"""Ingest throughput on generated photos: probing vs a full decode, and the Ray stage vs one process.

    .venv/bin/python benchmarks/ingest.py                 # 400 JPEG 1024x768 + 100 PNG 512x512
    .venv/bin/python benchmarks/ingest.py --jpegs 2000 --pngs 500 --tree 50 40 100

Baselines measured in the same run:
  - full decode: Image.open(...).convert("RGB") of every image (what a naive validity check does),
    against `probe_image` (header first, JPEG decoded at 1/8 scale via draft, PNG decoded fully);
  - one process: `ingest_unit` over every work unit in a plain loop, against the Ray Data stage
    (`jobs.stages.ingest.run`, Ray already started so its start-up is not counted).
Ratios (baseline time / our time, > 1 means faster) are printed after those. Last, the listing
alone on a tree of empty files: in this process vs split over Ray tasks (`--tree`).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lvd.curation.ingest import ingest_unit, probe_image
from lvd.jobs.engines import ensure_ray, shutdown_ray
from lvd.jobs.stage import StageContext
from lvd.jobs.stages import ingest as ingest_stage
from lvd.schemas import layout
from lvd.schemas.job_spec import Source, parse_job_spec


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour regions plus mild grain: compresses roughly like a photo (~100 KB at 1024x768)."""
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = base + rng.integers(-4, 5, base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_pool(folder: Path, jpegs: int, pngs: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    blobs = []
    for i in range(jpegs + pngs):
        buf = io.BytesIO()
        if i < jpegs:
            photo(rng, 1024, 768).save(buf, "JPEG", quality=90)
            name = f"{i:06d}.jpg"
        else:
            photo(rng, 512, 512).save(buf, "PNG")
            name = f"{i:06d}.png"
        (folder / name).write_bytes(buf.getvalue())
        blobs.append(buf.getvalue())
    return blobs


def make_tree(folder: Path, top: int, sub: int, files: int) -> int:
    """A two-level folder tree of empty .jpg files: listing reads names, not bytes."""
    for i in range(top):
        for j in range(sub):
            d = folder / f"{i:03d}" / f"{j:03d}"
            d.mkdir(parents=True)
            for k in range(files):
                (d / f"{k:04d}.jpg").touch()
    return top * sub * files


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fns: list, repeats: int = 2) -> list[float]:
    """Best time of each function over `repeats` interleaved rounds (the machine is shared)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timed(fn))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jpegs", type=int, default=400)
    ap.add_argument("--pngs", type=int, default=100)
    ap.add_argument("--files-per-part", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tree", type=int, nargs=3, default=(20, 20, 50), metavar=("TOP", "SUB", "FILES"),
        help="folder tree for the listing figures: TOP folders of SUB folders of FILES files",
    )  # fmt: skip
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lvd-bench-ingest-"))
    try:
        t = time.perf_counter()
        blobs = make_pool(root / "pool", args.jpegs, args.pngs, args.seed)
        n = len(blobs)
        print(
            f"generated {n} images ({sum(map(len, blobs)) / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f}s"
        )

        def full_decode() -> None:
            for b in blobs:
                with Image.open(io.BytesIO(b)) as img:
                    img.convert("RGB")

        def probe_all() -> None:
            for b in blobs:
                assert probe_image(b, 10**9)["status"] == "ok"

        t_full, t_probe = best_of([full_decode, probe_all])
        print(f"full decode   : {t_full:6.2f}s  {n / t_full:7.1f} img/s")
        print(f"probe_image   : {t_probe:6.2f}s  {n / t_probe:7.1f} img/s")

        spec = parse_job_spec(
            {
                "name": "bench-ingest",
                "output_dir": str(root / "out"),
                "pool": [{"uri": str(root / "pool")}],
                "sampling": {"target_size": 1},
                "embedding": {"retrieval": {"weights": "random"}},  # ingest only: never loaded
                "ingest": {"files_per_part": args.files_per_part},
                "ray": {"num_cpus": 2},
            }
        )
        units = ingest_stage.plan_units(spec)

        def one_process() -> None:
            rows = sum(ingest_unit(u, spec.ingest.max_pixels, spec.ingest.max_bytes).num_rows for u in units)
            assert rows == n

        t_loop = timed(one_process)
        ensure_ray(spec)
        ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=ingest_stage.STAGE)
        t_ray = timed(lambda: ingest_stage.run(ctx))
        t_resume = timed(lambda: ingest_stage.run(ctx))
        for part in layout.list_parts(ctx.stage_dir):
            part.unlink()
        t_warm = timed(lambda: ingest_stage.run(ctx))  # workers already up and imported
        print(f"one process   : {t_loop:6.2f}s  {n / t_loop:7.1f} img/s  ({len(units)} units)")
        print(f"Ray stage     : {t_ray:6.2f}s  {n / t_ray:7.1f} img/s  (2 CPUs, parts written by workers)")
        print(f"Ray stage warm: {t_warm:6.2f}s  {n / t_warm:7.1f} img/s  (parts deleted, workers reused)")
        print(f"rerun (resume): {t_resume:6.2f}s")
        print("ratios (baseline / ours):")
        print(f"  probe vs full decode        : {t_full / t_probe:5.2f}x")
        print(
            f"  Ray stage vs one process    : {t_loop / t_ray:5.2f}x (cold), {t_loop / t_warm:5.2f}x (warm)"
        )
        print(f"  resume vs first Ray run     : {t_ray / t_resume:5.1f}x")

        # Listing alone, on a deeper tree: in this process vs split over Ray tasks (workers warm).
        n_tree = make_tree(root / "tree", *args.tree)
        tree = spec.model_copy(update={"pool": [Source(uri=str(root / "tree"))]})
        serial: list = []
        t_list = timed(lambda: serial.extend(ingest_stage.plan_units(tree)))
        parallel: list = []
        t_list_ray = timed(lambda: parallel.extend(ingest_stage.plan_units(tree, ingest_stage.ray_mapper, 2)))
        assert parallel == serial
        print(f"listing {n_tree} files in {args.tree[0] * args.tree[1]} folders ({len(serial)} units):")
        print(f"  in this process : {t_list:6.2f}s  {n_tree / t_list:9.0f} files/s")
        print(f"  Ray tasks       : {t_list_ray:6.2f}s  {n_tree / t_list_ray:9.0f} files/s (same units)")
    finally:
        shutdown_ray()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
