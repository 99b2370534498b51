"""The Spark shard writer: balance, key rules, deterministic bytes, resume after a kill."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvd.jobs.shard_verify import verify_shards
from lvd.jobs.shard_writer import expand_samples, plan_shards
from lvd.jobs.stage import StageContext
from lvd.jobs.stages import shards as shard_stage
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec, parse_job_spec
from lvd.schemas.tables import CLUSTERS, CURATED, IMAGES, SHARD_SAMPLES, write_parquet_atomic

N_IMAGES = 60


def _encode(i: int, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def make_inputs(root: Path) -> dict[int, bytes]:
    """Images as files, tar members and parquet rows + the ingest/cluster/sample tables for them.

    Returns the original bytes by image_id (the reference the shards are checked against).
    """
    src = root / "src"
    src.mkdir(parents=True)
    originals, rows = {}, []
    tar_members, parquet_rows = [], []
    for i in range(N_IMAGES):
        image_id = 1000 + 7 * i
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        data = _encode(i, fmt)
        originals[image_id] = data
        row = {
            "image_id": image_id,
            "dataset": "pool",
            "size": len(data),
            "width": 16,
            "height": 12,
            "sha256": hashlib.sha256(data).hexdigest(),
            "format": fmt.lower(),
            "status": "ok",
            "error": None,
        }
        if i % 3 == 0:  # a file
            path = src / f"img{i}.{fmt.lower()}"
            path.write_bytes(data)
            row |= {"kind": "file", "path": str(path), "member": None, "offset": None, "uri": str(path)}
        elif i % 3 == 1:  # a tar member, addressed by data offset
            tar_members.append((row, f"m{i}.png", data))
        else:  # a parquet row
            row |= {"kind": "parquet", "member": "image", "offset": len(parquet_rows)}
            parquet_rows.append(data)
        rows.append(row)
    tar_path = src / "pool.tar"
    with tarfile.open(tar_path, "w") as tar:
        for _, name, data in tar_members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    for row, name, _ in tar_members:
        row |= {
            "kind": "tar",
            "path": str(tar_path),
            "member": name,
            "offset": offsets[name],
            "uri": f"{tar_path}#{name}",
        }
    pq_path = src / "pool.parquet"
    pq.write_table(pa.table({"image": pa.array(parquet_rows, pa.binary())}), pq_path)
    for row in rows:
        if row["kind"] == "parquet":
            row |= {"path": str(pq_path), "uri": f"{pq_path}#{row['offset']}"}
    out = root / "out"
    write_parquet_atomic(
        pa.Table.from_pylist(rows, schema=IMAGES), layout.table_part(out, layout.IMAGES, 0), IMAGES
    )
    # Clusters: [fine, coarse] with 3 coarse clusters of unequal sizes (0 holds the most); the last
    # 6 images are as_is seed images with no cluster row.
    clusters = [
        {"image_id": r["image_id"], "cluster_ids": [i % 6, (i % 6) // 2 if i < 30 else 0], "distance": 0.1}
        for i, r in enumerate(rows[:-6])
    ]
    write_parquet_atomic(
        pa.Table.from_pylist(clusters, schema=CLUSTERS), layout.table_part(out, layout.CLUSTERS, 0), CLUSTERS
    )
    curated = [
        {
            "image_id": r["image_id"],
            "sources": ["seedA"]
            if i >= N_IMAGES - 6
            else (["balanced", "seedB"] if i % 5 == 0 else ["balanced"]),
            "repeats": 3 if i % 10 == 0 else 1,
        }
        for i, r in enumerate(rows)
    ]
    write_parquet_atomic(
        pa.Table.from_pylist(curated, schema=CURATED), layout.table_part(out, layout.CURATED, 0), CURATED
    )
    return originals


def _spec(out: Path, **shards) -> JobSpec:
    return parse_job_spec(
        {
            "name": "t",
            "output_dir": str(out),
            "pool": [{"uri": "unused"}],
            "sampling": {"target_size": 10},
            "embedding": {"retrieval": {"weights": "random"}},
            "shards": shards,
            "spark": {
                "master": "local[2]",
                "driver_memory": "1g",
                "executor_memory": "1g",
                "conf": {"spark.ui.showConsoleProgress": "false"},
            },
        }
    )


def run_stage(out: Path, **shards) -> dict:
    ctx = StageContext(spec=_spec(out, **shards), out_dir=out, stage=shard_stage.STAGE)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    return shard_stage.run(ctx)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "_marker.json"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    originals = make_inputs(root)
    summary = run_stage(root / "out", samples_per_shard=9, seed=3)
    return root, originals, summary


def _shard_tables(d: Path) -> list[pa.Table]:
    return [pq.read_table(p) for p in sorted(d.glob("lvd-*.parquet"))]


def test_index_counts_sizes_and_repeats(written):
    root, originals, summary = written
    d = root / "out" / "shards"
    curated = pq.read_table(layout.table_part(root / "out", layout.CURATED, 0)).to_pylist()
    expected_total = sum(r["repeats"] for r in curated)
    index = json.loads((d / "index.json").read_text())
    n = len(index["shards"])
    assert n == -(-expected_total // 9)  # samples_per_shard=9
    assert [r["shard"] for r in index["shards"]] == [f"lvd-{i:06d}.tar" for i in range(n)]
    assert sorted(p.name for p in d.glob("*.tar")) == [f"lvd-{i:06d}.tar" for i in range(n)]
    assert index["pattern"] == f"lvd-{{000000..{n - 1:06d}}}.tar"
    counts = [r["samples"] for r in index["shards"]]
    assert max(counts) - min(counts) <= 1
    assert index["total"] == {
        "shards": n,
        "samples": expected_total,
        "bytes": sum(r["bytes"] for r in index["shards"]),
    }
    assert summary.samples == expected_total and summary.shards == n and summary.errors == 0
    assert pq.read_table(d / "index.parquet").to_pylist() == index["shards"]
    for row in index["shards"]:
        data = (d / row["shard"]).read_bytes()
        assert len(data) == row["bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"]
    # Every image appears exactly `repeats` times over the dataset.
    seen = Counter(i for t in _shard_tables(d) for i in t["image_id"].to_pylist())
    assert seen == Counter({r["image_id"]: r["repeats"] for r in curated})
    assert not list(d.glob(".*")) and not (d / "_plan.parquet").exists()
    assert verify_shards(d) == []


def test_members_keys_and_original_bytes(written):
    root, originals, _ = written
    d = root / "out" / "shards"
    images = {
        r["image_id"]: r for r in pq.read_table(layout.table_part(root / "out", layout.IMAGES, 0)).to_pylist()
    }
    clusters = {
        r["image_id"]: r["cluster_ids"]
        for r in pq.read_table(layout.table_part(root / "out", layout.CLUSTERS, 0)).to_pylist()
    }
    sources = {
        r["image_id"]: r["sources"]
        for r in pq.read_table(layout.table_part(root / "out", layout.CURATED, 0)).to_pylist()
    }
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}
    all_keys = []
    for tar_path in sorted(d.glob("*.tar")):
        members = read_tar(tar_path)
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        keys = [name.split(".", 1)[0] for name, _ in members[::2]]
        assert keys == sorted(keys)
        table = pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()
        assert [r["key"] for r in table] == keys
        for (img_name, img), (json_name, side), row in zip(members[::2], members[1::2], table, strict=True):
            key = row["key"]
            meta = json.loads(side)
            src = images[row["image_id"]]
            assert img_name == f"{key}.{ext[src['format']]}" and json_name == f"{key}.json"
            assert img == originals[row["image_id"]]  # the original bytes, never re-encoded
            assert meta["uri"] == src["uri"] and meta["sha256"] == src["sha256"] == row["sha256"]
            assert meta["image_id"] == str(row["image_id"]) and meta["shard"] == tar_path.name
            assert meta["sources"] == sources[row["image_id"]]
            assert meta["cluster_ids"] == clusters.get(row["image_id"])  # None for as_is seed images
        all_keys += keys
    assert len(set(all_keys)) == len(all_keys)
    assert all("." not in k and "/" not in k and 0 < len(k) < 128 for k in all_keys)


def test_clusters_and_sources_spread(written):
    """No shard holds more than its fair share of any coarse cluster or source set (tolerance: +1 sample,
    i.e. at most ceil(count / shards))."""
    root, _, _ = written
    d = root / "out" / "shards"
    tables = _shard_tables(d)
    n = len(tables)
    clusters = {
        r["image_id"]: r["cluster_ids"][-1]
        for r in pq.read_table(layout.table_part(root / "out", layout.CLUSTERS, 0)).to_pylist()
    }
    groups = {"cluster": lambda r: clusters.get(r["image_id"], -1), "sources": lambda r: tuple(r["sources"])}
    for name, group_of in groups.items():
        per_shard = [Counter(group_of(r) for r in t.to_pylist()) for t in tables]
        total = sum(per_shard, Counter())
        assert len(total) >= 3, name
        for g, count in total.items():
            fair = -(-count // n)
            assert max(c[g] for c in per_shard) <= fair, (name, g, [c[g] for c in per_shard])
    # A shard's samples are not one cluster run: every shard mixes at least two coarse clusters.
    assert all(len({clusters.get(i, -1) for i in t["image_id"].to_pylist()}) >= 2 for t in tables)


def test_rerun_identical_and_resume_after_kill(written, tmp_path):
    root, _, _ = written
    reference = tree_bytes(root / "out" / "shards")
    # A second, fresh run on the same input gives the same bytes.
    out2 = tmp_path / "out"
    for stage in ("ingest", "cluster", "sample"):
        (out2 / stage).mkdir(parents=True)
        (out2 / stage / "part-00000.parquet").write_bytes(
            (root / "out" / stage / "part-00000.parquet").read_bytes()
        )
    run_stage(out2, samples_per_shard=9, seed=3)
    d2 = out2 / "shards"
    assert tree_bytes(d2) == reference
    # Simulate a kill: two shards never written, one tar moved in but its parquet not yet
    # written (tar corrupted to prove it is redone), a temp file left behind, index not written.
    (d2 / "lvd-000001.tar").unlink()
    (d2 / "lvd-000001.parquet").unlink()
    (d2 / "lvd-000004.tar").unlink()
    (d2 / "lvd-000006.parquet").unlink()
    with open(d2 / "lvd-000006.tar", "r+b") as f:
        f.write(b"garbage")
    (d2 / ".lvd-000002.tar.0123.tmp").write_bytes(b"half a shard")
    (d2 / "index.json").unlink()
    kept = {p.name: p.stat() for p in d2.glob("lvd-00000[0357].*")}
    run_stage(out2, samples_per_shard=9, seed=3)
    assert tree_bytes(d2) == reference
    for name, st in kept.items():  # finished shards were kept, not rewritten
        now = (d2 / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    # A different seed is a different plan: every shard is rewritten and the stale one beyond the
    # new count disappears.
    run_stage(out2, samples_per_shard=12, seed=4)
    index = json.loads((d2 / "index.json").read_text())
    assert sorted(p.name for p in d2.glob("lvd-*.tar")) == [r["shard"] for r in index["shards"]]
    assert len(index["shards"]) == -(-index["total"]["samples"] // 12)


def _tables(root: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    out = root / "out"
    return (
        pq.read_table(layout.table_part(out, layout.CURATED, 0)),
        pq.read_table(layout.table_part(out, layout.IMAGES, 0)),
        pq.read_table(layout.table_part(out, layout.CLUSTERS, 0)),
    )


def test_plan_by_bytes_is_deterministic(tmp_path):
    from lvd.jobs.shard_writer import write_shard

    make_inputs(tmp_path)
    curated, images, clusters = _tables(tmp_path)
    limit = 40 * 1024
    plan = plan_shards(curated, images, clusters, samples_per_shard=1000, max_shard_bytes=limit, seed=1)
    assert plan.equals(plan_shards(curated, images, clusters, 1000, limit, seed=1))
    assert not plan["key"].equals(plan_shards(curated, images, clusters, 1000, limit, seed=2)["key"])
    shards = plan["shard"].to_numpy()
    counts = np.bincount(shards)
    assert len(counts) > 1 and counts.max() - counts.min() <= 1
    # The real tars stay under the byte target, and a limit this size does not need many more shards
    # than the total bytes require.
    out = tmp_path / "shards"
    out.mkdir()
    rows = plan.to_pylist()
    sizes = [write_shard(out, s, [r for r in rows if r["shard"] == s])["bytes"] for s in range(len(counts))]
    assert sizes == [(out / f"lvd-{s:06d}.tar").stat().st_size for s in range(len(counts))]
    assert max(sizes) <= limit
    assert len(counts) <= 2 * -(-sum(sizes) // limit)


def test_plan_rejects_missing_and_failed_images(tmp_path):
    make_inputs(tmp_path)
    curated, images, clusters = _tables(tmp_path)
    extra = pa.Table.from_pylist([{"image_id": 5, "sources": ["balanced"], "repeats": 1}], schema=CURATED)
    with pytest.raises(ValueError, match="not in the images table"):
        plan_shards(pa.concat_tables([curated, extra]), images, clusters, 10)
    failed = images.set_column(
        images.schema.get_field_index("status"), "status", pa.array(["error"] * images.num_rows)
    )
    with pytest.raises(ValueError, match="failed ingest"):
        expand_samples(curated, failed, clusters)


def test_changed_source_is_left_out_and_reported(tmp_path):
    from lvd.jobs.shard_writer import write_shard

    make_inputs(tmp_path)
    curated, images, clusters = _tables(tmp_path)
    plan = plan_shards(curated, images, clusters, samples_per_shard=100)
    rows = plan.to_pylist()
    victim = next(r for r in rows if r["kind"] == "file")
    Path(victim["path"]).write_bytes(b"not the image ingest saw")
    out = tmp_path / "shards"
    out.mkdir()
    meta = write_shard(out, 0, rows)
    bad_keys = {r["key"] for r in rows if r["image_id"] == victim["image_id"]}
    assert {e[0] for e in meta["errors"]} == bad_keys
    assert meta["samples"] == len(rows) - len(bad_keys)
    names = [n for n, _ in read_tar(out / "lvd-000000.tar")]
    assert len(names) == 2 * meta["samples"] and not any(n.split(".")[0] in bad_keys for n in names)


# ---------------------------------------------------------------- the Spark plan against `plan_shards`

SOURCE_SETS = [["balanced", "seedB"], ["balanced"], ["seedA"], ["seedB"], ["balanced", "seedA"]]


def synthetic_tables(n: int = 400, seed: int = 0) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Curated, images and clusters tables for planning only (no image bytes): signed ids, repeats
    1-3, three cluster levels, as_is images without a cluster row, one with an empty cluster list,
    source sets whose first appearance differs from their sorted order, uris of varied length and
    images that are not curated (one of them failed)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(1 << 40, n + 20, replace=False).astype(np.int64) - (1 << 39)
    images = [
        {"image_id": int(i), "dataset": "pool", "uri": f"/pool/{'d/' * int(rng.integers(0, 40))}{i}.jpg",
         "kind": "file", "path": f"/pool/{i}.jpg", "member": None, "offset": None,
         "size": int(rng.integers(1000, 200_000)), "sha256": f"{abs(int(i)):064x}", "width": 8, "height": 8,
         "format": "jpeg", "status": "error" if k == n else "ok", "error": None}
        for k, i in enumerate(ids)
    ]  # fmt: skip
    curated = [
        {"image_id": int(i), "sources": SOURCE_SETS[int(rng.integers(0, len(SOURCE_SETS)))],
         "repeats": int(rng.choice([1, 1, 1, 2, 3]))}
        for i in ids[:n]
    ]  # fmt: skip
    clusters = []
    for k, i in enumerate(ids[:n]):
        if k % 9 == 4:
            continue  # an as_is seed image: no cluster row
        fine = int(rng.integers(0, 40))
        levels = [] if k == 0 else [fine, fine // 5, fine // 20]
        clusters.append({"image_id": int(i), "cluster_ids": levels, "distance": 0.0})
    return (
        pa.Table.from_pylist(curated, schema=CURATED),
        pa.Table.from_pylist(images, schema=IMAGES),
        pa.Table.from_pylist(clusters, schema=CLUSTERS),
    )


def write_parts(out: Path, table: pa.Table, name: layout.Table, n_parts: int, seed: int) -> list[Path]:
    """`table` shuffled into `n_parts` parts of uneven sizes (the Spark plan must not depend on them)."""
    rng = np.random.default_rng(seed)
    rows = table.take(pa.array(rng.permutation(table.num_rows)))
    cuts = np.sort(rng.choice(np.arange(1, max(2, table.num_rows)), n_parts - 1, replace=False))
    bounds = [0, *cuts.tolist(), table.num_rows]
    paths = []
    for p in range(n_parts):
        path = layout.table_part(out, name, p)
        write_parquet_atomic(rows.slice(bounds[p], bounds[p + 1] - bounds[p]), path, table.schema)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def spark():
    from lvd.jobs.engines import get_spark

    return get_spark(_spec(Path("unused")))


@pytest.fixture(scope="module")
def synthetic_parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    curated, images, clusters = synthetic_tables()
    parts = [
        write_parts(out, curated, layout.CURATED, 3, 1),
        write_parts(out, images, layout.IMAGES, 4, 2),
        write_parts(out, clusters, layout.CLUSTERS, 2, 3),
    ]
    return out, (curated, images, clusters), parts


@pytest.mark.parametrize(
    ("samples_per_shard", "max_shard_bytes", "seed", "file_rows", "sort_rows", "one_task"),
    [(50, None, 0, 1 << 17, 1 << 21, False), (10_000, 600_000, 5, 64, 90, False), (1, None, 2, 100, 200, False),
     (10_000, 600_000, 5, 64, 90, True)],
)  # fmt: skip
def test_spark_plan_equals_reference(spark, synthetic_parts, monkeypatch, samples_per_shard, max_shard_bytes,
                                     seed, file_rows, sort_rows, one_task):  # fmt: skip
    """Row for row the plan of `plan_shards`, with repeats, as_is images, a byte target (whose
    loop runs more than once), inputs in several parts, the sort in one or several partitions and
    the plan in one or several files; planned by Spark's steps or, for a small output, in one task."""
    from lvd.jobs import shard_plan

    out, tables, parts = synthetic_parts
    expected = plan_shards(*tables, samples_per_shard, max_shard_bytes, seed)
    if max_shard_bytes is not None:  # the byte target needs more shards than the bytes alone
        assert expected["shard"][-1].as_py() + 1 > -(-sum(tables[1]["size"].to_pylist()) // max_shard_bytes)
    monkeypatch.setattr(shard_plan, "PLAN_FILE_ROWS", file_rows)
    monkeypatch.setattr(shard_plan, "SORT_PARTITION_ROWS", sort_rows)
    monkeypatch.setattr(shard_plan, "SMALL_PLAN_ROWS", tables[0].num_rows if one_task else 0)
    plan = shard_plan.plan_shards_spark(spark, *parts, out / "plan", samples_per_shard, max_shard_bytes, seed)
    assert (plan.n_samples, plan.n_shards) == (expected.num_rows, expected["shard"][-1].as_py() + 1)
    assert (plan.sort_partitions > 1) == (plan.n_samples > sort_rows and not one_task)
    assert plan.table().equals(expected)
    files = sorted((out / "plan").glob("plan-*.parquet"))
    assert len(files) == -(-plan.n_shards // plan.shards_per_file) and len(files) > (file_rows < 1000)
    shard = plan.n_shards - 1
    assert plan.rows(shard) == expected.filter(pc.equal(expected["shard"], shard)).to_pylist()
    assert not (out / "plan" / "ordered").exists()


@pytest.mark.parametrize("one_task", [False, True])
def test_spark_plan_keeps_unchanged_earlier_shards(spark, synthetic_parts, tmp_path, monkeypatch, one_task):
    """A grown output planned against an earlier version: the earlier shards whose samples are all
    unchanged are kept (not those holding a sample of an image gone or of one whose uri changed), and the
    other samples are planned as `plan_shards` plans them without the kept ones, numbered after
    every earlier shard; by Spark's steps and by the one-task plan."""
    from lvd.jobs import shard_plan
    from lvd.jobs.shard_writer import key_repeat

    _, (curated, images, clusters), _ = synthetic_parts
    first_plan = plan_shards(curated, images, clusters, 50, None, 3)
    earlier_dir = tmp_path / "v1"
    earlier_dir.mkdir()
    n_old = first_plan["shard"][-1].as_py() + 1
    tables = []
    for n in range(n_old):
        rows = first_plan.filter(pc.equal(first_plan["shard"], n))
        rows = rows.set_column(
            rows.schema.get_field_index("shard"), "shard", pa.array([layout.shard_name(n)] * rows.num_rows)
        )
        path = earlier_dir / layout.shard_table_name(n)
        write_parquet_atomic(rows.select(SHARD_SAMPLES.names).cast(SHARD_SAMPLES), path, SHARD_SAMPLES)
        tables.append(str(path))
    # Shard 1 loses an image, shard 2 an image's uri changes; new images join.
    gone = first_plan.filter(pc.equal(first_plan["shard"], 1))["image_id"][0].as_py()
    moved = first_plan.filter(pc.equal(first_plan["shard"], 2))["image_id"][0].as_py()
    more = synthetic_tables(60, seed=9)
    grown_curated, grown_images, grown_clusters = (
        pa.concat_tables(t) for t in zip((curated, images, clusters), more, strict=True)
    )
    grown_curated = grown_curated.filter(pc.not_equal(grown_curated["image_id"], gone))
    uri = grown_images.schema.get_field_index("uri")
    grown_images = grown_images.set_column(uri, "uri", pc.if_else(
        pc.equal(grown_images["image_id"], moved), "/elsewhere.jpg", grown_images["uri"]))  # fmt: skip
    assert set(curated["image_id"].to_pylist()) - set(grown_curated["image_id"].to_pylist()) == {gone}
    out = tmp_path / "grown"
    parts = [write_parts(out, grown_curated, layout.CURATED, 2, 5), write_parts(out, grown_images, layout.IMAGES, 3, 6),
             write_parts(out, grown_clusters, layout.CLUSTERS, 2, 7)]  # fmt: skip
    monkeypatch.setattr(shard_plan, "SMALL_PLAN_ROWS", 1 << 16 if one_task else 0)
    earlier = shard_plan.EarlierShards(tuple(tables), n_old + 2)  # an older version named two more
    plan = shard_plan.plan_shards_spark(spark, *parts, out / "plan", 50, None, 3, earlier=earlier)
    touched = pc.is_in(first_plan["image_id"], pa.array([gone, moved], pa.int64()))
    changed = set(first_plan.filter(touched)["shard"].to_pylist())  # an image's repeats: other shards
    assert {1, 2} <= changed and sorted(plan.kept) == sorted(set(range(n_old)) - changed)
    old = first_plan.filter(pa.array(np.isin(first_plan["shard"].to_numpy(), sorted(plan.kept))))
    assert plan.kept == {n: int((first_plan["shard"].to_numpy() == n).sum()) for n in plan.kept}
    exclude = pa.table({"image_id": old["image_id"], "repeat": key_repeat(old["key"])})
    expected = plan_shards(
        grown_curated, grown_images, grown_clusters, 50, None, 3, exclude=exclude, first=n_old + 2
    )
    assert plan.first == n_old + 2 and plan.table().equals(expected)
    assert expected["shard"][0].as_py() == n_old + 2 and 60 < expected.num_rows < first_plan.num_rows


def test_spark_plan_rejects_what_expand_samples_rejects(spark, tmp_path, monkeypatch):
    """Same errors, same order of checks, same messages (the ids named are the smallest), by
    Spark's steps and by the one-task plan of a small output."""
    from lvd.jobs import shard_plan
    from lvd.jobs.shard_plan import plan_shards_spark
    from lvd.jobs.shard_writer import ShardPlanError

    curated, images, clusters = synthetic_tables(60, seed=4)
    status = images.schema.get_field_index("status")
    repeats = curated.schema.get_field_index("repeats")
    extra = pa.Table.from_pylist([{"image_id": 5, "sources": ["balanced"], "repeats": 1},
                                  {"image_id": -3, "sources": ["balanced"], "repeats": 1}], schema=CURATED)  # fmt: skip
    cases = {
        "repeats": (curated.set_column(repeats, "repeats", pa.array([1] * 59 + [0], pa.int32())), images),
        "curated copies": (pa.concat_tables([curated, curated.slice(7, 1)]), images),
        "image copies": (curated, pa.concat_tables([images, images.slice(70, 1)])),
        "missing": (pa.concat_tables([curated, extra]), images),
        "failed": (curated, images.set_column(status, "status", pa.array(["ok", "error"] * 40))),
    }
    messages = {}
    for n, (name, (cur, img)) in enumerate(cases.items()):
        with pytest.raises(ShardPlanError) as reference:
            expand_samples(cur, img, clusters)
        out = tmp_path / str(n)
        parts = [write_parts(out, cur, layout.CURATED, 2, n), write_parts(out, img, layout.IMAGES, 2, n),
                 write_parts(out, clusters, layout.CLUSTERS, 1, n)]  # fmt: skip
        monkeypatch.setattr(shard_plan, "SMALL_PLAN_ROWS", 0)  # Spark's steps
        with pytest.raises(ShardPlanError) as err:
            plan_shards_spark(spark, *parts, out / "plan", 10)
        messages[name] = str(err.value)
        assert str(err.value) == str(reference.value), name
        if name == "missing":
            monkeypatch.setattr(shard_plan, "SMALL_PLAN_ROWS", 1 << 16)  # one task
            with pytest.raises(ShardPlanError, match=re.escape(str(reference.value))):
                plan_shards_spark(spark, *parts, out / "plan", 10)
    assert "e.g. [-3, 5]" in messages["missing"] and "failed ingest" in messages["failed"]
    # Nothing curated: no shards, as in `plan_shards`.
    out = tmp_path / "empty"
    parts = [write_parts(out, images, layout.IMAGES, 2, 0), write_parts(out, clusters, layout.CLUSTERS, 1, 0)]
    plan = plan_shards_spark(spark, [], *parts, out / "plan", 10)
    assert (plan.n_shards, plan.n_samples) == (0, 0) and plan.table().equals(
        plan_shards(CURATED.empty_table(), images, clusters, 10)
    )


def test_stage_driver_reads_no_sample_rows(written, tmp_path, monkeypatch):
    """The stage's driver never reads a table's rows (Spark's executors, separate processes, do):
    with every parquet row reader of the driver process broken, it writes the same shards."""
    root, _, _ = written
    out = tmp_path / "out"
    for stage in ("ingest", "cluster", "sample"):
        (out / stage).mkdir(parents=True)
        (out / stage / "part-00000.parquet").write_bytes(
            (root / "out" / stage / "part-00000.parquet").read_bytes()
        )

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read parquet rows")

    import lvd.jobs.shard_writer as shard_writer

    for name in ("read_table", "ParquetFile", "ParquetDataset"):
        monkeypatch.setattr(pq, name, refuse)
    monkeypatch.setattr(shard_writer, "plan_shards", refuse)
    monkeypatch.setattr(shard_writer, "expand_samples", refuse)
    run_stage(out, samples_per_shard=9, seed=3)
    monkeypatch.undo()
    assert tree_bytes(out / "shards") == tree_bytes(root / "out" / "shards")


def test_collect_with_progress_counts_tasks(spark, caplog):
    """The writing job's progress: finished tasks counted as they finish, results in order, and a
    failing task's error raised in the caller."""
    import logging
    import time

    from lvd.jobs.engines import collect_with_progress
    from lvd.jobs.progress import Progress

    def slow_square(x: int) -> int:
        time.sleep(0.3)
        return x * x

    rdd = spark.sparkContext.parallelize(range(6), 6).map(slow_square)
    with caplog.at_level(logging.INFO, logger="lvd"):
        assert collect_with_progress(spark, rdd, Progress("squares", 6, "tasks", every=0)) == [
            x * x for x in range(6)
        ]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("squares: ")]
    assert lines and "6/6 tasks (100%)" in lines[-1]
    failing = spark.sparkContext.parallelize([1], 1).map(lambda x: x // 0)
    with pytest.raises(Exception, match="ZeroDivisionError"):
        collect_with_progress(spark, failing, Progress("failing", 1, "tasks"))


def test_tar_bytes_equal_tarfiles(tmp_path):
    """The batched tar writer writes exactly what tarfile writes in PAX format for the same members:
    short names through the header template, long and non-ASCII names through PAX headers, empty
    and block-sized data, and a member count that ends on and off a 10 KiB record."""
    import tarfile

    from lvd.jobs.shard_writer import _tar_info, write_tar

    rng = np.random.default_rng(3)
    members = [(f"000000_{i:06d}_{i}_0.jpg", rng.bytes(int(rng.integers(0, 3000)))) for i in range(40)]
    members += [("a" * 150 + ".json", b"{}"), ("caf\u00e9.png", bytes(512)), ("empty.jpg", b"")]
    for count in (1, 7, len(members)):
        reference = io.BytesIO()
        with tarfile.open(fileobj=reference, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members[:count]:
                tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
        path = tmp_path / f"t{count}.tar"
        size, sha = write_tar(path, members[:count])
        assert path.read_bytes() == reference.getvalue()
        assert (size, sha) == (len(reference.getvalue()), hashlib.sha256(reference.getvalue()).hexdigest())
    assert not [p for p in tmp_path.iterdir() if layout.is_temp(p.name)]


def test_parquet_rows_come_from_the_file_as_it_is_now(tmp_path):
    """Row groups kept for later shards are read again once the file changes (same path)."""
    import os

    from lvd.jobs.shard_writer import read_parquet_rows

    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [b"a0", b"a1", b"a2"]}), path, row_group_size=2)
    assert read_parquet_rows(str(path), "image", [0, 2]) == {0: b"a0", 2: b"a2"}
    pq.write_table(pa.table({"image": [b"b0", b"b1", b"b2"]}), path, row_group_size=2)
    os.utime(path, ns=(0, 12345))  # even a rewrite within the mtime's resolution changes the key
    assert read_parquet_rows(str(path), "image", [1, 2]) == {1: b"b1", 2: b"b2"}


def test_shard_tasks_group_shards_and_keep_every_core_busy():
    from lvd.jobs.stages.shards import MAX_SHARDS_PER_TASK, TASKS_PER_CORE, shard_tasks

    assert shard_tasks(0, 2) == 1 and shard_tasks(3, 2) == 3  # never more tasks than shards
    assert shard_tasks(24, 2) == 2 * TASKS_PER_CORE  # several shards per task
    many = 100 * MAX_SHARDS_PER_TASK
    assert -(-many // shard_tasks(many, 2)) <= MAX_SHARDS_PER_TASK  # capped shards per task
    assert shard_tasks(24, 64) == 24
