"""Embed stage throughput vs a bare PyTorch loop, and the model's FLOP/s vs a large matmul's, in one run.

Same images (JPEG photos-sized), same model (ViT-S/14 at 224 px), same precision (the spec's default,
`auto`: bf16 on CPUs with native bf16) and the same number of torch threads on both sides: the bare
loop uses actors x threads, the stage runs its real Ray Data pipeline (decode tasks + `--actors` model
actors of `--threads` each). Ray gets one logical CPU more than the actors use so a decode task can run
beside them, as on a GPU node where decode has its own cores.

Start-up (Ray Data planning, worker and actor processes, model build) is a fixed cost per run, not per
image. The stage also runs on a pool of one batch per actor first; the difference between the two
runs gives its rate once started (marginal: extra images / extra seconds) and its start-up seconds,
printed beside the end-to-end rate. (The small run goes first: Ray's idle decode workers are reused by
the large run, while model actors start anew in each.) On a shared machine wall-clock rates also measure how much CPU share
each side wins, so CPU seconds per image (this process and all its descendants, from /proc) are
compared too. Both sides run with the OpenMP wait policy the product uses (embeddings/cpu_threads.py;
set OMP_WAIT_POLICY in the environment to compare another). Ratios are printed last.

The compute limit is the bf16 (or fp32) matmul rate divided by the model's FLOP per image (matmuls,
the patch convolution and attention): no implementation of this model can embed faster on this CPU.
It is given per wall-clock second (the best of the matmul timings before and after the run, the least
disturbed) and per CPU-second (which load barely moves).

    .venv/bin/python benchmarks/embed.py [--images 256] [--batch-size 32] [--actors 1] [--threads 2]
        [--precision auto]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
from pathlib import Path

from lvd.embeddings.cpu_threads import wait_passively

OMP_POLICY = wait_passively()  # before torch loads, as the embed actors do

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lvd.embeddings.models import load_embedding_model  # noqa: E402
from lvd.embeddings.preprocess import preprocess_image  # noqa: E402
from lvd.jobs.engines import ensure_ray  # noqa: E402
from lvd.jobs.stage import StageContext  # noqa: E402
from lvd.jobs.stages import embed  # noqa: E402
from lvd.schemas import layout  # noqa: E402
from lvd.schemas.job_spec import parse_job_spec  # noqa: E402
from lvd.schemas.tables import IMAGES, write_parquet_atomic  # noqa: E402


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


def matmul_flops(n: int = 2048, reps: int = 4, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(FLOP per wall second of the fastest of `reps` n x n matmuls, FLOP per CPU-second over all)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, cpu0 = float("inf"), time.process_time()
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, 2 * n**3 * reps / (time.process_time() - cpu0)


def attention_cpu_ms(
    batch: int, tokens: int, dim: int, heads: int, dtype: torch.dtype, reps: int = 5
) -> dict:
    """CPU ms per call of one block's attention (after the qkv projection) on a [batch, tokens] input:
    SDPA's fused kernel against the batched-matmul path the model runs in bf16 on CPU."""
    import torch.nn.functional as F

    from lvd.embeddings.layers.attention import bf16_cpu_attention

    qkv = torch.randn(batch, tokens, 3 * dim).to(dtype)
    d = dim // heads

    def sdpa():
        q, k, v = qkv.reshape(batch, tokens, 3, heads, d).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)

    out = {}
    with torch.inference_mode():
        for name, fn in (("sdpa", sdpa), ("matmuls", lambda: bf16_cpu_attention(qkv, heads))):
            fn()
            cpu0 = time.process_time()
            for _ in range(reps):
                fn()
            out[name] = 1e3 * (time.process_time() - cpu0) / reps
    return out


def model_flops_per_image(module, size: int) -> int:
    """FLOP of one image's forward, attention included (counted through SDPA's math path, whose
    matmuls the counter sees; the fused CPU kernel is invisible to it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    x = torch.zeros(1, 3, size, size)
    with counter, torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        module(x.to(next(module.parameters()).dtype))
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--actors", type=int, default=1, help="model actors of the stage")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads per actor (default: cores / actors)"
    )
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    args = ap.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.actors)
    total_threads = threads * args.actors
    torch.set_num_threads(total_threads)

    tmp = tempfile.TemporaryDirectory(prefix="lvd-bench-embed-")
    work = Path(tmp.name)
    paths = make_images(work / "img", args.images)
    out, small_out = work / "out", work / "small"
    write_ingest_table(out, paths, per_part=64)
    n_small = args.batch_size * args.actors
    write_ingest_table(small_out, paths[:n_small], per_part=args.batch_size)
    spec = parse_job_spec(
        {
            "name": "bench",
            "output_dir": str(out),
            "pool": [{"uri": str(work / "img")}],
            "sampling": {"target_size": 1},
            "ray": {"num_cpus": total_threads + 1},
            "embedding": {
                "retrieval": {
                    "arch": "vit_small",
                    "weights": "random",  # speed does not depend on the weights' values
                    "batch_size": args.batch_size,
                    "dtype": "float32",
                    "precision": args.precision,
                },
                "copy_detection": None,  # the retrieval ViT alone, as the bare loop runs it
                "num_actors": args.actors,
                "cpus_per_actor": threads,
            },
        }
    )
    model = load_embedding_model(spec.embedding.retrieval, "cpu")
    precision = "bf16" if model.compute_dtype == torch.bfloat16 else "fp32"
    print(
        f"{args.images} JPEGs ~500x375, ViT-S/14 at 224 px {precision} ({args.precision}), batch "
        f"{args.batch_size}; stage: {args.actors} actor(s) x {threads} thread(s), bare loop: "
        f"{total_threads} threads; OpenMP wait policy {OMP_POLICY}"
    )
    mm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mm_before = matmul_flops(dtype=mm_dtype)

    # Bare loop before and after the stage, averaged: the machine is shared, so load drifts.
    before = bare_loop(model, paths, args.batch_size)
    ensure_ray(spec)  # one-time per job, not part of the per-image cost
    t0 = time.perf_counter()
    small = embed.run(StageContext(spec=spec, out_dir=small_out, stage=embed.STAGE))
    small_s = time.perf_counter() - t0
    ctx = StageContext(spec=spec, out_dir=out, stage=embed.STAGE)
    with CpuMeter() as meter:
        t0 = time.perf_counter()
        summary = embed.run(ctx)
        stage_s = time.perf_counter() - t0
    after = bare_loop(model, paths, args.batch_size)
    mm_after = matmul_flops(dtype=mm_dtype)
    bare = {k: (before[k] + after[k]) / 2 for k in before}
    stage_ips = summary.images / stage_s
    # Both runs pay the same fixed costs: their difference is the rate of a started stage.
    steady_ips = (summary.images - small.images) / (stage_s - small_s) if stage_s > small_s else float("nan")
    startup_s = small_s - small.images / steady_ips
    print(
        f"bare loop: {bare['ips']:.2f} img/s (before {before['ips']:.2f}, after {after['ips']:.2f}; "
        f"decode+preprocess {bare['decode_ms']:.1f} ms/img, forward {bare['forward_ms']:.1f} ms/img)"
    )
    stage_cpu = meter.seconds / summary.images
    print(
        f"stage: {stage_ips:.2f} img/s end to end ({stage_s:.1f} s for {summary.images} images; "
        f"{small_s:.1f} s for {small.images}); {steady_ips:.2f} img/s once started; start-up {startup_s:.1f} s"
    )
    print(
        f"CPU per image: bare loop {bare['cpu_s_per_img']:.3f} s, stage {stage_cpu:.3f} s "
        f"(driver + raylet + decode tasks + actors, start-up included)"
    )

    flops_img = model_flops_per_image(model.module, model.preprocess.crop_size)
    model_fps = flops_img * 1e3 / bare["forward_ms"]
    mm_fps = max(mm_before[0], mm_after[0])
    mm_cpu_fps = max(mm_before[1], mm_after[1])
    limit_ips = mm_fps / flops_img
    print(
        f"model: {flops_img / 1e9:.2f} GFLOP/img -> {model_fps / 1e9:.1f} GFLOP/s in the bare loop; "
        f"{precision} matmul 2048^3: {mm_fps / 1e9:.1f} GFLOP/s (best of before/after: "
        f"{mm_before[0] / 1e9:.1f}, {mm_after[0] / 1e9:.1f}), {mm_cpu_fps / 1e9:.1f} GFLOP per CPU-second "
        f"-> compute limit {limit_ips:.1f} img/s"
    )

    tokens = (model.preprocess.crop_size // model.module.patch_size) ** 2 + 1
    attn = attention_cpu_ms(args.batch_size, tokens, model.module.embed_dim, model.module.num_heads, mm_dtype)
    print(
        f"attention at {tokens} tokens, batch {args.batch_size}, {precision}: SDPA {attn['sdpa']:.1f} CPU ms "
        f"per block, batched matmuls + softmax (the model's path in bf16 on CPU) {attn['matmuls']:.1f}"
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
    print(f"ratio stage / bare loop images/s, end to end: {stage_ips / bare['ips']:.3f}")
    print(f"ratio stage / bare loop images/s, once started: {steady_ips / bare['ips']:.3f}")
    print(f"ratio stage / bare loop images per CPU-second: {bare['cpu_s_per_img'] / stage_cpu:.3f}")
    print(f"ratio stage / {precision} compute limit, end to end: {stage_ips / limit_ips:.3f}")
    print(f"ratio stage / {precision} compute limit, once started: {steady_ips / limit_ips:.3f}")
    print(f"ratio stage / {precision} compute limit per CPU-second: {flops_img / stage_cpu / mm_cpu_fps:.3f}")
    print(f"ratio model FLOP/s / {precision} matmul FLOP/s: {model_fps / mm_fps:.3f}")
    print(f"ratio forward fp32 ms / {precision} ms: {fp32_ms / bare['forward_ms']:.3f}")
    print(f"ratio attention CPU, SDPA / batched matmuls: {attn['sdpa'] / attn['matmuls']:.3f}")


if __name__ == "__main__":
    main()
