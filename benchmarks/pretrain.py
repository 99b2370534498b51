"""Pretraining throughput of the tiny config on CPU, its achieved FLOP/s against a large matmul's, and
kNN accuracy of the trained teacher against the same network at random initialisation.

    .venv/bin/python benchmarks/pretrain.py [--steps 150] [--batch 32] [--threads 0] [--colours grey]
        [--precision fp32|bf16]

The training pool and the labelled set come from the demo's class generators. By default they are grey, so
only the patterns tell the classes apart: with each class in its own hues (--colours class) an untrained
network already scores ~0.98 by colour and the comparison shows nothing.

The trainer runs with the OpenMP wait policy `lvd pretrain` uses (embeddings/cpu_threads.py; set
OMP_WAIT_POLICY in the environment to compare another). FLOPs per step count every matmul and
convolution of the teacher forward and the student forward and backward, attention included.

All figures come from this run on this machine; ratios are printed last.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

from lvd.embeddings.cpu_threads import wait_passively

OMP_POLICY = wait_passively()  # before torch loads, as `lvd pretrain` does

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from lvd.jobs.demo import CLASS_NAMES, COLOURS, build_labelled_folder, generate_image  # noqa: E402
from lvd.schemas import layout  # noqa: E402
from lvd.training.augment import MultiCrop, MultiCropConfig, augment_batch  # noqa: E402
from lvd.training.config import load_config  # noqa: E402
from lvd.training.knn_eval import knn_val_scores, load_eval_backbone, paired_test  # noqa: E402
from lvd.training.masking import BlockMaskGenerator, sample_masks  # noqa: E402
from lvd.training.meta_arch import SSLMetaArch  # noqa: E402
from lvd.training.train import pretrain  # noqa: E402


def write_pool_shards(out: Path, n_images: int, per_shard: int, seed: int, colours: str) -> str:
    """Unlabelled training images from the demo's class generators as lvd-style WebDataset shards."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_shards = -(-n_images // per_shard)
    for s in range(n_shards):
        with wds.TarWriter(str(out / layout.shard_name(s))) as w:
            for i in range(s * per_shard, min(n_images, (s + 1) * per_shard)):
                buf = io.BytesIO()
                label = int(rng.integers(len(CLASS_NAMES)))
                generate_image(rng, label, colours).save(buf, "JPEG", quality=90)
                w.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "json": b"{}"})
    return str(out / layout.shard_pattern(n_shards))


def matmul_flops(n: int = 2048, trials: int = 5, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(FLOP/s of the best of `trials` timings of an n x n matmul, the least disturbed by other load;
    FLOP per CPU-second over all trials, which load barely moves)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best, cpu0 = float("inf"), time.process_time()
    for _ in range(trials):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, 2 * n**3 * trials / (time.process_time() - cpu0)


def flops_per_step(cfg, images) -> float:
    """Matmul/conv FLOPs of one training step (teacher forward + student forward and backward),
    attention through SDPA's math path so the counter sees its matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = SSLMetaArch(cfg).train()
    c = cfg.crops
    mc = MultiCrop(
        MultiCropConfig(
            c.global_crops_size,
            c.local_crops_size,
            c.global_crops_scale,
            c.local_crops_scale,
            c.local_crops_number,
        )
    )
    crops = augment_batch(images, mc, seed=0, rank=0, step=0)
    grid = c.global_crops_size // cfg.model.patch_size
    masks = sample_masks(
        2 * len(images),
        BlockMaskGenerator((grid, grid), max_num_patches=grid * grid // 2),
        np.random.default_rng(0),
    )
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model.forward_backward(crops, masks, 0.04)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=1024, help="training images")
    ap.add_argument(
        "--per-class",
        type=int,
        default=100,
        help="labelled train (and val) images per class for kNN (100: one val image is 0.00125 of top-1)",
    )
    ap.add_argument(
        "--colours",
        choices=COLOURS,
        default="grey",
        help="class: each class its own hues (an untrained network already separates them by colour); "
        "random: random hues; grey: no colour. With random or grey only the patterns tell classes apart.",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="training precision (bf16: autocast on the CPU); the matmul rate is measured in the same dtype",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/lvd-bench-pretrain"))
    ap.add_argument(
        "--override",
        default="{}",
        help='config overrides as JSON, e.g. the recipe\'s init: \'{"model": {"layerscale_init": 1e-5}}\'',
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    shards = write_pool_shards(args.work / "shards", args.pool, 128, seed=1, colours=args.colours)
    labelled = build_labelled_folder(args.work / "labelled", args.per_class, seed=2, colours=args.colours)
    epoch_length = max(1, args.pool // args.batch)
    overrides: dict = {
        "train": {
            "batch_size_per_gpu": args.batch,
            "epoch_length": epoch_length,
            "checkpoint_every": args.steps,
        },
        "optim": {"epochs": args.steps / epoch_length},
        "compute": {"precision": args.precision},
    }
    for section, values in json.loads(args.override).items():
        overrides.setdefault(section, {}).update(values)
    cfg = load_config("tiny", overrides)
    print(
        f"torch threads: {torch.get_num_threads()} (OpenMP wait policy {OMP_POLICY}), config tiny: {cfg.model.arch}, global {cfg.crops.global_crops_size}px, "
        f"{cfg.crops.local_crops_number} x local {cfg.crops.local_crops_size}px, batch {args.batch}, {args.steps} steps"
    )

    mm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak, peak_cpu = matmul_flops(dtype=mm_dtype)
    print(
        f"matmul 2048^3 {args.precision}: {peak / 1e9:.1f} GFLOP/s, {peak_cpu / 1e9:.1f} GFLOP per CPU-second"
    )
    rng = np.random.default_rng(3)
    step_flops = flops_per_step(
        cfg, [generate_image(rng, i % len(CLASS_NAMES), args.colours) for i in range(args.batch)]
    )
    print(f"FLOPs per step (teacher fwd + student fwd/bwd): {step_flops / 1e9:.1f} GFLOP")

    torch.manual_seed(cfg.train.seed)
    random_backbone = SSLMetaArch(cfg).teacher.backbone.eval()  # the run's own initial weights
    knn_random = knn_val_scores(random_backbone, labelled)
    print(f"kNN random init: top-1 {knn_random.top1:.4f} on {len(knn_random.labels)} val images")

    stamps: list[float] = []
    cpu_stamps: list[float] = []  # this process's CPU time: trainer and augmentation threads

    def on_step(step: int, row: dict) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())

    result = pretrain(cfg, shards, args.work / "run", resume=False, on_step=on_step)
    warm = min(3, len(stamps) - 2)
    ips = (len(stamps) - 1 - warm) * args.batch / (stamps[-1] - stamps[warm])
    cpu_per_step = (cpu_stamps[-1] - cpu_stamps[warm]) / (len(stamps) - 1 - warm)
    losses = [r["total"] for r in result.losses]
    k = max(1, len(losses) // 10)
    print(f"loss: first {k} steps {np.mean(losses[:k]):.3f} -> last {k} steps {np.mean(losses[-k:]):.3f}")
    print(
        f"dino: {np.mean([r['dino'] for r in result.losses[:k]]):.3f} -> {np.mean([r['dino'] for r in result.losses[-k:]]):.3f}, "
        f"ibot: {np.mean([r['ibot'] for r in result.losses[:k]]):.3f} -> {np.mean([r['ibot'] for r in result.losses[-k:]]):.3f}, "
        f"koleo: {np.mean([r['koleo'] for r in result.losses[:k]]):.3f} -> {np.mean([r['koleo'] for r in result.losses[-k:]]):.3f}"
    )
    print(f"training: {ips:.1f} images/s ({ips / args.batch:.2f} steps/s), {result.bad_samples} bad samples")
    achieved = step_flops * ips / args.batch
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s")
    # Again after training: the machine may be busier at either time.
    peak_after, peak_cpu_after = matmul_flops(dtype=mm_dtype)
    peak, peak_cpu = max(peak, peak_after), max(peak_cpu, peak_cpu_after)
    print(
        f"matmul peak (best before/after training): {peak / 1e9:.1f} GFLOP/s, {peak_cpu / 1e9:.1f} per CPU-second"
    )
    achieved_cpu = step_flops / cpu_per_step
    print(f"achieved per CPU-second (augmentation included): {achieved_cpu / 1e9:.1f} GFLOP")

    knn_trained = knn_val_scores(load_eval_backbone(result.teacher_export), labelled)
    print(f"kNN trained teacher: top-1 {knn_trained.top1:.4f}")
    # Paired on the same val images (McNemar): only images where the two models disagree count.
    test = paired_test(knn_trained.correct, knn_random.correct)
    gained, lost, z = test.only_a, test.only_b, test.z
    print(f"val images right only when trained: {gained}, only at random init: {lost}, McNemar z = {z:+.2f}")
    print(f"achieved FLOP/s / {args.precision} matmul FLOP/s: {achieved / peak:.3f}")
    print("--- ratios ---")
    print(f"achieved FLOP/s / matmul FLOP/s: {achieved / peak:.3f}")
    print(f"achieved FLOP per CPU-second / matmul FLOP per CPU-second: {achieved_cpu / peak_cpu:.3f}")
    print(
        f"kNN top-1 trained / random init: {knn_trained.top1:.3f} / {knn_random.top1:.3f} = "
        f"{knn_trained.top1 / max(knn_random.top1, 1e-9):.2f} (McNemar z {z:+.2f}; |z| > 2 is beyond noise)"
    )


if __name__ == "__main__":
    main()
