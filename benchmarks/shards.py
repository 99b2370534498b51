"""Shard writing throughput: the Spark writer vs a single-process webdataset.TarWriter, and the disk.

All are measured in this run on the same machine, in alternating rounds (other work on the
machine moves every figure, so each round's ratios compare figures taken minutes apart at most):
- disk: sequential write of one large file, then fsync (what any writer is bounded by);
- single: one Python process reading every image from its source (files, tar members, parquet rows)
  and writing the same shards with webdataset.TarWriter (each tar fsynced, like the Spark writer's);
- lvd, one process: lvd's own shard writer (`write_shard`) for every shard in one process, so that
  the gap to spark is Spark's part and the gap to the disk is the writer's;
- spark: `write_shards_spark` (a Spark task per run of shards, local[*]) on the same plan; the Spark
  session is started before the clock starts (its start-up time is printed separately).
The plan itself is made once by `plan_shards_spark` (on executors, from the tables' parts) and
timed apart, beside the in-memory reference `plan_shards` on the same tables.

Targets: spark >= 0.5 x single, spark >= 0.7 x disk in the median round. Run: .venv/bin/python benchmarks/shards.py [--images N]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from lvd.jobs.engines import get_spark, stop_spark
from lvd.jobs.shard_plan import plan_shards_spark
from lvd.jobs.shard_writer import (
    image_extension,
    plan_shards,
    read_sources,
    sample_json,
    shard_name,
    write_shard,
)
from lvd.jobs.stages.shards import shard_tasks, write_shards_spark
from lvd.schemas import layout
from lvd.schemas.job_spec import parse_job_spec
from lvd.schemas.tables import CLUSTERS, CURATED, IMAGES, write_parquet_atomic

MB = 1e6


def make_pool(root: Path, n_images: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Noise JPEGs (~100 KB each, incompressible like real photos): a third as files, a third as
    members of one tar, a third as rows of one parquet; plus the images/curated/clusters tables."""
    rng = np.random.default_rng(0)
    blobs = []
    base = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    for i in range(n_images):
        pixels = np.roll(base, i, axis=0) ^ np.uint8(i % 251)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    rows = []
    tar_path, pq_path = root / "pool.tar", root / "pool.parquet"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(1, n_images, 3):
            info = tarfile.TarInfo(f"{i}.jpg")
            info.size = len(blobs[i])
            tar.addfile(info, io.BytesIO(blobs[i]))
    with tarfile.open(tar_path) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    pq.write_table(pa.table({"image": pa.array(blobs[2::3], pa.binary())}), pq_path, row_group_size=64)
    for i, data in enumerate(blobs):
        row = {"image_id": i, "dataset": "pool", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
               "width": 256, "height": 256, "format": "jpeg", "status": "ok", "error": None}  # fmt: skip
        if i % 3 == 0:
            path = root / f"{i}.jpg"
            path.write_bytes(data)
            row |= {"kind": "file", "path": str(path), "member": None, "offset": None, "uri": str(path)}
        elif i % 3 == 1:
            row |= {"kind": "tar", "path": str(tar_path), "member": f"{i}.jpg", "offset": offsets[f"{i}.jpg"],
                    "uri": f"{tar_path}#{i}.jpg"}  # fmt: skip
        else:
            row |= {"kind": "parquet", "path": str(pq_path), "member": "image", "offset": i // 3,
                    "uri": f"{pq_path}#{i // 3}"}  # fmt: skip
        rows.append(row)
    images = pa.Table.from_pylist(rows, schema=IMAGES)
    curated = pa.Table.from_pylist(
        [{"image_id": i, "sources": ["balanced"], "repeats": 1} for i in range(n_images)], schema=CURATED
    )
    clusters = pa.Table.from_pylist(
        [{"image_id": i, "cluster_ids": [i % 50, i % 5], "distance": 0.0} for i in range(n_images)],
        schema=CLUSTERS,
    )
    return images, curated, clusters


def write_tables(
    out: Path, tables: dict[layout.Table, pa.Table], n_parts: int
) -> dict[layout.Table, list[Path]]:
    """Each table as `n_parts` parts, as the upstream stages leave them."""
    parts = {}
    for table, rows in tables.items():
        bounds = np.linspace(0, rows.num_rows, n_parts + 1).astype(int)
        parts[table] = [layout.table_part(out, table, p) for p in range(n_parts)]
        for p, path in enumerate(parts[table]):
            write_parquet_atomic(rows.slice(bounds[p], bounds[p + 1] - bounds[p]), path, table.schema)
    return parts


def disk_write_mb_s(path: Path, total_bytes: int = 1 << 30) -> float:
    """Sequential write of `total_bytes` in 8 MiB blocks, then fsync (dd conv=fsync)."""
    block = os.urandom(8 << 20)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(total_bytes // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return total_bytes / MB / seconds


def single_process_write(plan: pa.Table, out: Path) -> tuple[int, float]:
    """The same shards with webdataset.TarWriter in one process: (bytes written, seconds).

    Sources are read with the shard writer's own reader (`read_sources`), so only the writing differs.
    """
    out.mkdir()
    rows = plan.to_pylist()
    t0 = time.perf_counter()
    total = 0
    for s in sorted({r["shard"] for r in rows}):
        path = out / shard_name(s)
        with open(path, "wb") as f:
            with wds.TarWriter(f) as tar:
                for r, data in read_sources([r for r in rows if r["shard"] == s]):
                    tar.write(
                        {"__key__": r["key"], image_extension(r["format"]): data, "json": sample_json(r)}
                    )
            f.flush()
            os.fsync(f.fileno())
        total += path.stat().st_size
    return total, time.perf_counter() - t0


def lvd_one_process_write(plan: pa.Table, out: Path) -> tuple[int, float, float]:
    """The same shards with lvd's `write_shard`, one after another in this process: (bytes,
    seconds, CPU seconds of this process: what the writer costs whatever else runs on the machine)."""
    out.mkdir()
    rows = plan.to_pylist()
    c0 = time.process_time()
    t0 = time.perf_counter()
    total = sum(
        write_shard(out, s, [r for r in rows if r["shard"] == s])["bytes"]
        for s in sorted({r["shard"] for r in rows})
    )
    return total, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-mib", type=int, default=1024, help="bytes written to measure the disk")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lvd-bench-shards-"))
    try:
        (root / "src").mkdir()
        images, curated, clusters = make_pool(root / "src", args.images)
        parts = write_tables(
            root / "job", {layout.CURATED: curated, layout.IMAGES: images, layout.CLUSTERS: clusters}, 4
        )
        print(f"pool: {args.images} images, {sum(images['size'].to_pylist()) / MB:.0f} MB")

        spec = parse_job_spec({"name": "bench", "output_dir": str(root), "pool": [{"uri": "unused"}],
                               "embedding": {"retrieval": {"weights": "random"}},
                               "sampling": {"target_size": 1}, "spark": {"master": "local[*]", "conf": {"spark.ui.showConsoleProgress": "false"}}})  # fmt: skip
        t0 = time.perf_counter()
        spark = get_spark(spec)
        # Start the Python workers too (they are reused by the writer's tasks).
        spark.sparkContext.parallelize(range(8), 8).map(lambda x: x).collect()
        print(f"spark session start: {time.perf_counter() - t0:.1f} s (not counted)")
        t0 = time.perf_counter()
        reference = plan_shards(curated, images, clusters, args.samples_per_shard, seed=0)
        print(f"plan in memory (plan_shards, the reference): {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        plan = plan_shards_spark(
            spark, parts[layout.CURATED], parts[layout.IMAGES], parts[layout.CLUSTERS], root / "plan",
            args.samples_per_shard,
        )  # fmt: skip
        print(f"plan on Spark executors (plan_shards_spark): {time.perf_counter() - t0:.2f} s, "
              f"{plan.n_shards} shards, {plan.sort_partitions} sort partitions")  # fmt: skip
        if not plan.table().equals(reference):
            raise SystemExit("the Spark plan differs from plan_shards")
        # Other work on the machine makes single runs noisy: alternate the writers and the disk,
        # keep each one's best, and the best of each round's spark / disk.
        disk, single, one, spark_mb_s, cpu_per_mb = 0.0, 0.0, 0.0, 0.0, float("inf")
        round_ratios: list[float] = []
        per_shard_ratios: list[float] = []  # a Spark task per shard (the writer's layout before)
        cores = spark.sparkContext.defaultParallelism
        tasks = shard_tasks(plan.n_shards, cores)
        for r in range(args.rounds):
            disk_r = disk_write_mb_s(root / "dd.bin", args.disk_mib << 20)
            disk = max(disk, disk_r)
            print(
                f"round {r}: disk sequential write + fsync: {disk_r:.0f} MB/s, load {os.getloadavg()[0]:.1f}"
            )
            single_bytes, single_s = single_process_write(reference, root / f"single{r}")
            single = max(single, single_bytes / MB / single_s)
            print(f"round {r}: single-process webdataset.TarWriter: {single_bytes / MB:.0f} MB in {single_s:.2f} s "
                  f"= {single_bytes / MB / single_s:.1f} MB/s")  # fmt: skip
            one_bytes, one_s, one_cpu = lvd_one_process_write(reference, root / f"one{r}")
            one = max(one, one_bytes / MB / one_s)
            cpu_per_mb = min(cpu_per_mb, one_cpu / (one_bytes / MB))
            print(f"round {r}: lvd write_shard, one process: {one_bytes / MB:.0f} MB in {one_s:.2f} s "
                  f"= {one_bytes / MB / one_s:.1f} MB/s, {1e3 * one_cpu / (one_bytes / MB):.2f} CPU ms per MB")  # fmt: skip
            for label, n_tasks, ratios in (
                (f"{tasks} tasks", tasks, round_ratios),
                ("a task per shard", plan.n_shards, per_shard_ratios),
            ):
                t0 = time.perf_counter()
                results = write_shards_spark(spark, plan, root / f"spark{r}", n_tasks=n_tasks)
                spark_s = time.perf_counter() - t0
                spark_bytes = sum(x["bytes"] for x in results)
                if n_tasks == tasks:
                    spark_mb_s = max(spark_mb_s, spark_bytes / MB / spark_s)
                ratios.append(spark_bytes / MB / spark_s / disk_r)
                print(f"round {r}: spark writer ({cores} cores, {label}): "
                      f"{spark_bytes / MB:.0f} MB in {spark_s:.2f} s = {spark_bytes / MB / spark_s:.1f} MB/s, "
                      f"{ratios[-1]:.2f} of this round's disk, load {os.getloadavg()[0]:.1f}")  # fmt: skip
                shutil.rmtree(root / f"spark{r}")
            for name in ("single", "one"):
                shutil.rmtree(root / f"{name}{r}")
        stop_spark()

        print(f"best: disk {disk:.0f} MB/s, single-process {single:.1f} MB/s, lvd one process {one:.1f} MB/s, "
              f"spark {spark_mb_s:.1f} MB/s")  # fmt: skip
        print(f"ratio spark / single-process: {spark_mb_s / single:.2f} (target >= 0.5)")
        print(
            f"ratio spark / disk: {spark_mb_s / disk:.2f} (best of each); per round: "
            f"{' '.join(f'{x:.2f}' for x in round_ratios)}, median {np.median(round_ratios):.2f} (target >= 0.7)"
        )
        print(
            f"a task per shard, spark / disk per round: {' '.join(f'{x:.2f}' for x in per_shard_ratios)}, "
            f"median {np.median(per_shard_ratios):.2f}"
        )
        print(f"ratio lvd one process / disk: {one / disk:.2f}")
        print(f"lvd writer CPU: {1e3 * cpu_per_mb:.2f} ms per MB, so {cores} cores of it alone write "
              f"{cores / cpu_per_mb:.0f} MB/s = {cores / cpu_per_mb / disk:.2f} of the disk (the bound without other load)")  # fmt: skip
        print(f"ratio single-process / disk: {single / disk:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
