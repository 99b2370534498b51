"""Embed stage throughput vs a bare PyTorch loop, and the model's FLOP/s vs a large matmul's, in one run.

Same images (JPEG photos-sized), same model (ViT-S/14 at 224 px), same precision (the spec's default,
`auto`: bf16 autocast on CPUs with native bf16) and same thread count for both.
The stage runs its real Ray Data pipeline (decode tasks + one model actor); Ray gets one logical CPU
more than the actor uses so a decode task can run beside it, as on a GPU node where decode has
its own cores. On a shared machine wall-clock rates also measure how much CPU share each side wins,
so CPU seconds per image (this process and all its descendants, from /proc) are compared too.
Ratios are printed last.

The compute limit is the bf16 (or fp32) matmul rate divided by the model's FLOP per image: no
implementation of this model can embed faster on this CPU.

    .venv/bin/python benchmarks/embed.py [--images 192] [--batch-size 32] [--precision auto]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from lvd.embeddings.models import load_embedding_model
from lvd.embeddings.preprocess import preprocess_image
from lvd.jobs.engines import ensure_ray
from lvd.jobs.stage import StageContext
from lvd.jobs.stages import embed
from lvd.schemas import layout
from lvd.schemas.job_spec import parse_job_spec
from lvd.schemas.tables import IMAGES, write_parquet_atomic


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + texture, 500x375 and 375x500) so decode costs what it does on real data."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c + i) * 0.5 + 0.5 for c in range(3)], axis=-1) * 200
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        p = folder / f"{i:05d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def write_ingest_table(out_dir: Path, paths: list[Path], per_part: int) -> None:
    rows = [
        dict(image_id=i, dataset="pool", uri=str(p), kind="file", path=str(p), member=None, offset=None,
             size=p.stat().st_size, sha256=None, width=None, height=None, format="jpeg", status="ok", error=None)
        for i, p in enumerate(paths)
    ]  # fmt: skip
    for k in range(0, len(rows), per_part):
        table = pa.Table.from_pylist(rows[k : k + per_part], IMAGES)
        write_parquet_atomic(table, layout.table_part(out_dir, layout.IMAGES, k // per_part), IMAGES)


def bare_loop(model, paths: list[Path], batch_size: int) -> dict:
    """Decode, preprocess and forward in one process, batch by batch; first batch is warm-up."""
    model.embed(np.stack([preprocess_image(p.read_bytes(), model.preprocess) for p in paths[:batch_size]]))
    t_decode = t_forward = 0.0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for k in range(0, len(paths), batch_size):
        a = time.perf_counter()
        x = np.stack([preprocess_image(p.read_bytes(), model.preprocess) for p in paths[k : k + batch_size]])
        b = time.perf_counter()
        model.embed(x)
        t_decode += b - a
        t_forward += time.perf_counter() - b
    total = time.perf_counter() - t0
    n = len(paths)
    return {
        "ips": n / total,
        "cpu_s_per_img": (time.process_time() - cpu0) / n,
        "decode_ms": 1e3 * t_decode / n,
        "forward_ms": 1e3 * t_forward / n,
    }


class CpuMeter:
    """CPU seconds used by this process and all its descendants (Ray's raylet and workers) while active.

    The machine is shared, so wall-clock rates depend on how much CPU share each side wins (more runnable
    threads win more); CPU seconds per image do not. Linux /proc, sampled every 0.2 s.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()

    def _sample(self) -> dict[int, float]:
        stats = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                # after "pid (comm)": state ppid ... utime(12th) stime(13th)
                stats[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick)
        root, mine = os.getpid(), {}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                mine[pid] = stats[pid][1]
            todo += children.get(pid, [])
        return mine

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.last.update(self._sample())

    def __enter__(self) -> CpuMeter:
        self.base = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())

    @property
    def seconds(self) -> float:
        return sum(t - self.base.get(pid, 0.0) for pid, t in self.last.items())


def matmul_flops(n: int = 2048, reps: int = 6, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def model_flops_per_image(module, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory(prefix="lvd-bench-embed-")
    work = Path(tmp.name)
    paths = make_images(work / "img", args.images)
    out = work / "out"
    write_ingest_table(out, paths, per_part=64)
    spec = parse_job_spec(
        {
            "name": "bench",
            "output_dir": str(out),
            "pool": [{"uri": str(work / "img")}],
            "sampling": {"target_size": 1},
            "ray": {"num_cpus": args.threads + 1},
            "embedding": {
                "retrieval": {
                    "arch": "vit_small",
                    "weights": "random",  # speed does not depend on the weights' values
                    "batch_size": args.batch_size,
                    "dtype": "float32",
                    "precision": args.precision,
                },
                "num_actors": 1,
                "cpus_per_actor": args.threads,
            },
        }
    )
    model = load_embedding_model(spec.embedding.retrieval, "cpu")
    precision = "bf16" if model.autocast_dtype == torch.bfloat16 else "fp32"
    print(
        f"{args.images} JPEGs ~500x375, ViT-S/14 at 224 px {precision} ({args.precision}), "
        f"{args.threads} threads, batch {args.batch_size}"
    )

    # Bare loop before and after the stage, averaged: the machine is shared, so load drifts.
    before = bare_loop(model, paths, args.batch_size)
    ensure_ray(spec)  # one-time per job, not part of the per-image cost
    ctx = StageContext(spec=spec, out_dir=out, stage=embed.STAGE)
    with CpuMeter() as meter:
        t0 = time.perf_counter()
        summary = embed.run(ctx)
        stage_s = time.perf_counter() - t0
    after = bare_loop(model, paths, args.batch_size)
    bare = {k: (before[k] + after[k]) / 2 for k in before}
    stage_ips = summary.images / stage_s
    print(
        f"bare loop: {bare['ips']:.2f} img/s (before {before['ips']:.2f}, after {after['ips']:.2f}; "
        f"decode+preprocess {bare['decode_ms']:.1f} ms/img, forward {bare['forward_ms']:.1f} ms/img)"
    )
    stage_cpu = meter.seconds / summary.images
    print(
        f"stage: {stage_ips:.2f} img/s end to end, actor start included "
        f"({stage_s:.1f} s for {summary.images} images)"
    )
    print(
        f"CPU per image: bare loop {bare['cpu_s_per_img']:.3f} s, stage {stage_cpu:.3f} s "
        f"(driver + raylet + decode tasks + actor, start-up included)"
    )

    flops_img = model_flops_per_image(model.module, model.preprocess.crop_size)
    model_fps = flops_img * 1e3 / bare["forward_ms"]
    mm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mm_fps = matmul_flops(dtype=mm_dtype)
    limit_ips = mm_fps / flops_img
    print(
        f"model: {flops_img / 1e9:.2f} GFLOP/img -> {model_fps / 1e9:.1f} GFLOP/s; "
        f"{precision} matmul 2048^3: {mm_fps / 1e9:.1f} GFLOP/s -> compute limit {limit_ips:.1f} img/s"
    )

    # What the precision changes: the fp32 vectors of the same crops, and how far the used ones are.
    fp32 = load_embedding_model(spec.embedding.retrieval.model_copy(update={"precision": "float32"}), "cpu")
    x = np.stack([preprocess_image(p.read_bytes(), model.preprocess) for p in paths[: args.batch_size]])
    fp32.embed(x)
    t0 = time.perf_counter()
    v32 = fp32.embed(x)
    fp32_ms = 1e3 * (time.perf_counter() - t0) / len(x)
    err = np.abs(model.embed(x) - v32).max()
    print(f"fp32 forward {fp32_ms:.1f} ms/img; max |v_{precision} - v_fp32| = {err:.2e}")

    tmp.cleanup()
    print(f"ratio stage / bare loop images/s: {stage_ips / bare['ips']:.3f}")
    print(f"ratio stage / bare loop images per CPU-second: {bare['cpu_s_per_img'] / stage_cpu:.3f}")
    print(f"ratio stage / {precision} compute limit: {stage_ips / limit_ips:.3f}")
    print(f"ratio model FLOP/s / {precision} matmul FLOP/s: {model_fps / mm_fps:.3f}")
    print(f"ratio forward fp32 ms / {precision} ms: {fp32_ms / bare['forward_ms']:.3f}")


if __name__ == "__main__":
    main()
