"""Driver memory of the whole pipeline (ingest to shards) at two or more pool sizes.

The rule this measures: the process that runs a job (the driver) holds what grows with the number of
parts or clusters, never with the number of images. For each size a fresh subprocess runs the job with
`lvd run` (the CLI, called in that process) and then prints its own peak resident memory (VmHWM of
/proc/self/status: the driver alone, not Ray's workers nor Spark's JVM). Printed: each size's driver
peak, images per second per stage (pool images / the stage marker's seconds), and the growth in bytes
per image between sizes, against the target of 0.5 KB (500 bytes) per image.

Pools are generated once and kept under --work (32 px JPEG/PNG in WebDataset tars of
--files-per-part images, so each tar is one ingest part; Zipf-skewed classes; planted exact and
near copies; two seed sets and an eval set). Each run starts from an empty output folder.
Models are tiny and random: a ViT-Tiny with 4 blocks and 8 px patches at 32 px for retrieval, and
the demo's copy-detection stand-in for dedup.

    .venv/bin/python benchmarks/scale.py                        # 20k and 200k images
    .venv/bin/python benchmarks/scale.py --sizes 2000,20000     # a quick run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

# Before FAISS/torch load OpenMP: spinning OpenMP threads starve each other on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

GENERATOR_VERSION = 1
IMAGE_SIZE = 32
N_CLASSES = 12
EXACT_FRACTION = NEAR_FRACTION = 0.03
EVAL_IMAGES = 20
SEED_SETS = {
    # name: (strategy, classes, count, extra spec fields)
    "tail_sample": ("sample", (10, 11), 64, {"k": 4}),
    "tail_cluster": ("cluster", (9,), 32, {"min_seed_images": 3, "images_per_cluster": 200}),
}
EXACT_BELOW = 1000
MIN_SIZE = 2 * EXACT_BELOW
TARGET_BYTES_PER_IMAGE = 500  # 0.5 KB
RESULT_PREFIX = "SCALE_RESULT "


# ---------------------------------------------------------------------------------------------
# The generated pool


def _class_colours(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.1, 0.9, (N_CLASSES, 3))


def _render(rng: np.random.Generator, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """uint8 [B, 32, 32, 3]: a random 16x16 luminance field (bilinear-upsampled), tinted by the class
    colour, with faint stripes at the class's frequency. The field gives distinct images uncorrelated
    low-pass thumbnails, so the copy-detection stand-in scores them near zero and their copies near one."""
    import torch
    import torch.nn.functional as F

    b = len(labels)
    field = torch.from_numpy(rng.uniform(0, 1, (b, 1, 16, 16)).astype(np.float32))
    field = F.interpolate(field, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = np.arange(IMAGE_SIZE, dtype=np.float32)
    freq = (1 + labels % 6).astype(np.float32)[:, None, None] / IMAGE_SIZE
    phase = rng.uniform(0, 2 * np.pi, (b, 1, 1)).astype(np.float32)
    stripes = np.sin(2 * np.pi * freq * (x[None, :, None] + x[None, None, :]) + phase)
    img = 0.6 * field.numpy()[:, 0, :, :, None] + 0.3 * colours[labels][:, None, None, :]
    img = img + 0.04 * stripes[..., None] + 0.02 * rng.standard_normal((b, IMAGE_SIZE, IMAGE_SIZE, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _near_copy(rng: np.random.Generator, pixels: np.ndarray) -> bytes:
    """Brightness and contrast changed, re-encoded as a lower-quality JPEG: a copy an exact hash misses."""
    gain, offset = rng.uniform(0.85, 1.1), rng.uniform(-12, 12)
    changed = np.clip(pixels.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    return _encode(changed, "JPEG", int(rng.integers(60, 80)))


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def job_spec(n: int, n_tars: int) -> dict:
    return {
        "name": f"scale-{n}",
        "output_dir": "output",
        "pool": [{"uri": f"data/pool/pool-{{00000..{n_tars - 1:05d}}}.tar", "kind": "tar"}],
        "seeds": [
            {"name": name, "strategy": strategy, "sources": [{"uri": f"data/seeds/{name}"}], **extra}
            for name, (strategy, _classes, _count, extra) in SEED_SETS.items()
        ],
        "eval_sets": [{"name": "holdout", "sources": [{"uri": "data/eval/holdout"}]}],
        "embedding": {
            "retrieval": {
                "arch": "vit_tiny_d4",
                "weights": "random",  # driver memory does not depend on the weights' values
                "patch_size": 8,
                "image_size": IMAGE_SIZE,
                "resize_size": IMAGE_SIZE,
                "batch_size": 256,
                "dtype": "float32",
            },
            "copy_detection": {
                "arch": "torchscript",
                "weights": "data/copy_detection.pt",
                "image_size": IMAGE_SIZE,
                "resize_size": IMAGE_SIZE,
                "batch_size": 256,
            },
        },
        # IVF over the pool at every measured size, so all sizes take the same code path (flat search at
        # 200k is too slow here); the eval set and seed sets stay below exact_below.
        "dedup": {
            "k": 8,
            "index": "IVF256,Flat",
            "nprobe": 8,
            "exact_below": EXACT_BELOW,
            "eval_threshold": 0.8,  # the eval images are near copies (cosine ~1); chance pairs reach ~0.5
        },
        "retrieval": {"index": "IVF256,Flat", "nprobe": 8, "exact_below": EXACT_BELOW},
        "clustering": {"levels": [{"k": 64}, {"k": 8, "resampling_steps": 1}], "niter": 10},
        "sampling": {"target_size": n // 4},
        "shards": {"samples_per_shard": 1000},
        "ray": {"num_cpus": 2},
        "spark": {"master": "local[2]", "driver_memory": "1g", "executor_memory": "1g"},
    }


def build_pool(folder: Path, n: int, files_per_part: int, seed: int = 0) -> Path:
    """Generate (once) a pool of n images under folder/data and its job spec; returns the spec's path."""
    import yaml

    from lvd.jobs.demo import write_copy_detection_model

    data = folder / "data"
    job_path = folder / "job.yaml"
    params = {"version": GENERATOR_VERSION, "n": n, "files_per_part": files_per_part, "seed": seed}
    manifest = data / "manifest.json"
    if manifest.exists() and job_path.exists() and json.loads(manifest.read_text()) == params:
        return job_path
    shutil.rmtree(data, ignore_errors=True)
    (data / "pool").mkdir(parents=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, n])
    colours = _class_colours(rng)
    weights = 1.0 / np.arange(1, N_CLASSES + 1)
    n_exact, n_near = int(EXACT_FRACTION * n), int(NEAR_FRACTION * n)
    # Copies sit at random positions; each is of an original written before it, so one pass writes all.
    roles = np.zeros(n, dtype=np.int8)  # 0 original, 1 exact copy, 2 near copy
    slots = np.sort(rng.choice(np.arange(1, n), size=n_exact + n_near, replace=False))
    roles[slots] = rng.permutation(np.r_[np.ones(n_exact, np.int8), np.full(n_near, 2, np.int8)])
    original_at = np.flatnonzero(roles == 0)
    before = np.searchsorted(original_at, slots)  # originals before each copy (at least one)
    copy_of = np.full(n, -1)
    copy_of[slots] = original_at[(rng.random(len(slots)) * before).astype(np.int64)]
    eval_of = rng.choice(original_at, size=EVAL_IMAGES, replace=False)
    labels = rng.choice(N_CLASSES, size=len(original_at), p=weights / weights.sum())
    needed = set(copy_of[slots].tolist()) | set(eval_of.tolist())
    kept: dict[int, tuple[np.ndarray, bytes, str]] = {}  # originals that a copy or the eval set needs
    n_tars = -(-n // files_per_part)
    batch = 2048
    next_original = 0
    for t in range(n_tars):
        with tarfile.open(data / "pool" / f"pool-{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            lo, hi = t * files_per_part, min(n, (t + 1) * files_per_part)
            for s in range(lo, hi, batch):
                e = min(hi, s + batch)
                originals = np.flatnonzero(roles[s:e] == 0) + s
                pixels = _render(rng, labels[next_original : next_original + len(originals)], colours)
                next_original += len(originals)
                rendered = dict(zip(originals.tolist(), pixels, strict=True))
                for i in range(s, e):
                    if roles[i] == 0:
                        ext = "jpg" if rng.random() < 0.7 else "png"
                        fmt = "JPEG" if ext == "jpg" else "PNG"
                        blob = _encode(rendered[i], fmt, int(rng.integers(80, 96)))
                        if i in needed:
                            kept[i] = (rendered[i], blob, ext)
                    elif roles[i] == 1:
                        _, blob, ext = kept[int(copy_of[i])]
                    else:
                        ext, blob = "jpg", _near_copy(rng, kept[int(copy_of[i])][0])
                    _tar_add(tar, f"i{i:07d}.{ext}", blob)
    for name, (_strategy, classes, count, _extra) in SEED_SETS.items():
        seed_dir = data / "seeds" / name
        seed_dir.mkdir(parents=True)
        seed_labels = np.array([classes[j % len(classes)] for j in range(count)])
        for j, px in enumerate(_render(rng, seed_labels, colours)):
            (seed_dir / f"{j:04d}.png").write_bytes(_encode(px, "PNG"))
    (data / "eval" / "holdout").mkdir(parents=True)
    for j, i in enumerate(eval_of):
        (data / "eval" / "holdout" / f"{j:04d}.jpg").write_bytes(_near_copy(rng, kept[int(i)][0]))
    write_copy_detection_model(data / "copy_detection.pt", seed)
    job_path.write_text(yaml.safe_dump(job_spec(n, n_tars), sort_keys=False))
    manifest.write_text(json.dumps(params))  # last: its presence means the pool is complete
    print(f"generated {n:,} images in {n_tars} tars in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
    return job_path


# ---------------------------------------------------------------------------------------------
# One measured run (in its own process) and the report


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(job_path: Path, quiet: bool) -> None:
    """`lvd run` of the job, in this process; then print this process's peak RSS (the driver's)."""
    import lvd.jobs.pipeline  # noqa: F401  (imported before the baseline: `lvd run` loads it anyway)
    from lvd.jobs.cli import app
    from lvd.jobs.engines import shutdown_ray, stop_spark

    hwm_imports = _vm_kib("VmHWM")
    t0 = time.perf_counter()
    code = app(["run", str(job_path), *(["--quiet"] if quiet else [])], standalone_mode=False)
    if code:  # typer.Exit of a failed run, returned rather than raised outside standalone mode
        sys.exit(code)
    seconds = time.perf_counter() - t0
    result = {"hwm_kib": _vm_kib("VmHWM"), "hwm_imports_kib": hwm_imports, "seconds": seconds}
    stop_spark()
    shutdown_ray()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def measure(job_path: Path, quiet: bool) -> dict:
    """A fresh process runs the job from an empty output folder; its result and stage seconds."""
    from lvd.jobs.pipeline import stage_summaries
    from lvd.schemas.job_spec import load_job_spec

    out_dir = Path(load_job_spec(job_path).output_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(job_path)]
    proc = subprocess.run(cmd + (["--quiet"] if quiet else []), stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"run of {job_path} failed (exit {proc.returncode}):\n{proc.stdout}")
    stage_rows = proc.stdout.split("\nfunnel:")[0]  # `lvd run`'s row per stage (the funnel comes below)
    print(stage_rows, flush=True)
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["stage_seconds"] = {name: secs for name, (_, secs) in stage_summaries(out_dir).items()}
    return result


def report(results: dict[int, dict]) -> float:
    """Print the table; returns the growth in bytes per image between the smallest and largest size."""
    sizes = sorted(results)
    mib = 1024
    print("\ndriver peak RSS (VmHWM of the process that runs the job):")
    print(f"  {'images':>9} {'peak MiB':>9} {'after imports MiB':>18} {'job s':>8}")
    for n in sizes:
        r = results[n]
        print(
            f"  {n:>9,} {r['hwm_kib'] / mib:>9.0f} {r['hwm_imports_kib'] / mib:>18.0f} {r['seconds']:>8.0f}"
        )
    print("\npool images per second per stage (stage seconds from its marker):")
    print(f"  {'stage':<9}" + "".join(f" {f'{n:,} img':>14}" for n in sizes))
    for stage in results[sizes[0]]["stage_seconds"]:
        cells = []
        for n in sizes:
            secs = results[n]["stage_seconds"].get(stage)
            cells.append(f" {f'{n / secs:,.0f}/s' if secs else '-':>14}")
        print(f"  {stage:<9}" + "".join(cells))
    print("\ngrowth of the driver's peak RSS per image:")
    pairs = list(zip(sizes, sizes[1:], strict=False))
    if len(sizes) > 2:
        pairs.append((sizes[0], sizes[-1]))
    for a, b in pairs:
        growth = (results[b]["hwm_kib"] - results[a]["hwm_kib"]) * 1024 / (b - a)
        print(f"  {a:,} -> {b:,}: {growth:,.0f} bytes/image ({growth / 1000:.2f} KB/image)")
    overall = (results[sizes[-1]]["hwm_kib"] - results[sizes[0]]["hwm_kib"]) * 1024 / (sizes[-1] - sizes[0])
    verdict = "within" if overall < TARGET_BYTES_PER_IMAGE else "ABOVE"
    print(f"  {verdict} the target of {TARGET_BYTES_PER_IMAGE} bytes (0.5 KB) per image")
    return overall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lvd-scale"), help="Pools and outputs live here.")
    ap.add_argument("--sizes", default="20000,200000", help="Pool sizes, comma-separated (at least two).")
    ap.add_argument("--files-per-part", type=int, default=4000, help="Images per tar (one ingest part each).")
    ap.add_argument("--quiet", action="store_true", help="`lvd run --quiet`: only the runs' warnings.")
    ap.add_argument("--check", action="store_true", help="Exit 1 when the growth is above the target.")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child, args.quiet)
        return
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if len(sizes) < 2 or sizes[0] < MIN_SIZE:
        ap.error(f"--sizes needs at least two sizes of {MIN_SIZE} images or more")
    results = {}
    for n in sizes:
        job_path = build_pool(args.work / f"pool-{n}", n, args.files_per_part)
        print(f"running {job_path} ({n:,} images)", flush=True)
        results[n] = measure(job_path, args.quiet)
        print(
            f"  driver peak {results[n]['hwm_kib'] / 1024:.0f} MiB in {results[n]['seconds']:.0f} s",
            flush=True,
        )
    growth = report(results)
    if args.check and growth >= TARGET_BYTES_PER_IMAGE:
        sys.exit(1)


if __name__ == "__main__":
    main()
