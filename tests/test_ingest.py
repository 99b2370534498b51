"""Ingest: bad inputs become rows with reasons, containers read back byte-exact, ids stable, the
Ray stage resumes without duplicating rows."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvd.curation.image_io import read_image_bytes
from lvd.curation.ingest import (
    SourceError,
    SourceSet,
    WorkUnit,
    check_sources,
    expand_braces,
    id_key,
    ingest_unit,
    list_work_units,
    probe_image,
    root_labels,
    stable_image_id,
)
from lvd.jobs.demo import bomb_png
from lvd.jobs.stage import StageContext
from lvd.schemas import layout
from lvd.schemas.job_spec import Source, parse_job_spec

MAX_PIXELS = 1_000_000
MAX_BYTES = 1_000_000


def rows_by_uri(table: pa.Table) -> dict[str, dict]:
    return {r["uri"]: r for r in table.to_pylist()}


# ---------------------------------------------------------------------------------------------
# probe_image and files


def test_every_bad_file_kind_gets_its_reason_and_good_files_in_the_same_unit_are_ok(tmp_path, image_bytes):
    folder = tmp_path / "pool"
    folder.mkdir()
    good = {
        "rgb.png": (image_bytes("png", (40, 30), seed=1), 40, 30, "png"),
        "rgb.jpg": (image_bytes("jpg", (33, 21), seed=2), 33, 21, "jpeg"),
        "rgb.webp": (image_bytes("webp", (20, 20), seed=3), 20, 20, "webp"),
        "cmyk.jpg": (image_bytes("jpg", (24, 16), mode="CMYK", seed=4), 24, 16, "jpeg"),
        "gray16.png": (image_bytes("png", (18, 12), mode="I;16", seed=5), 18, 12, "png"),
        "palette.png": (image_bytes("png", (16, 16), mode="P", seed=6), 16, 16, "png"),
        "la.png": (image_bytes("png", (16, 8), mode="LA", seed=7), 16, 8, "png"),
        "gray.gif": (image_bytes("gif", (12, 12), mode="L", seed=8), 12, 12, "gif"),
        "small.bmp": (image_bytes("bmp", (10, 14), seed=9), 10, 14, "bmp"),
    }
    jpeg = image_bytes("jpg", (64, 64), seed=10)
    png = image_bytes("png", (64, 64), seed=11)
    bad = {
        "empty.jpg": (b"", "empty file"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated image"),
        "cut.png": (png[: len(png) // 2], "truncated image"),
        "notes.jpg": (b"plain text, not a JPEG\n" * 8, "not an image"),
        "bomb.png": (bomb_png(2000, 1000), "decompression bomb: 2000 x 1000 > 1000000"),
        "huge.png": (image_bytes("png", (600, 600), seed=12), "too large"),
    }
    for name, (data, *_rest) in good.items():
        (folder / name).write_bytes(data)
    for name, (data, _reason) in bad.items():
        (folder / name).write_bytes(data)
    os.symlink(tmp_path / "gone.jpg", folder / "broken.jpg")  # a broken symlink: unreadable
    (folder / "labels.json").write_text("{}")  # not an image extension: listed all the same, counted

    units = list_work_units([Source(uri=str(folder))], "pool", files_per_part=100)
    assert len(units) == 1
    max_bytes = len(bad["huge.png"][0]) - 1
    rows = rows_by_uri(ingest_unit(units[0], MAX_PIXELS, max_bytes))
    assert set(rows) == {str(folder / n) for n in [*good, *bad, "broken.jpg", "labels.json"]}
    assert rows[str(folder / "labels.json")]["error"] == "not an image"

    for name, (data, width, height, fmt) in good.items():
        row = rows[str(folder / name)]
        assert (row["status"], row["error"]) == ("ok", None), name
        assert (row["width"], row["height"], row["format"]) == (width, height, fmt), name
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["size"] == len(data) and row["kind"] == "file" and row["path"] == str(folder / name)
    for name, (_data, reason) in bad.items():
        row = rows[str(folder / name)]
        assert row["status"] == "error", name
        assert row["error"].startswith(reason), (name, row["error"])
    broken = rows[str(folder / "broken.jpg")]
    assert broken["status"] == "error" and broken["error"].startswith("unreadable: FileNotFoundError")
    assert rows[str(folder / "bomb.png")]["width"] == 2000  # the header was read, the pixels were not


def test_unreadable_paths_are_rows_not_crashes(tmp_path, image_bytes):
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "ok.png").write_bytes(image_bytes("png", seed=1))
    unit = WorkUnit(
        "pool", "files", (str(tmp_path / "dir.jpg"), str(tmp_path / "missing.jpg"), str(tmp_path / "ok.png"))
    )
    rows = rows_by_uri(ingest_unit(unit, MAX_PIXELS, MAX_BYTES))
    assert rows[str(tmp_path / "dir.jpg")]["error"] == "unreadable: IsADirectoryError: Is a directory"
    assert rows[str(tmp_path / "missing.jpg")]["error"].startswith("unreadable: FileNotFoundError")
    assert rows[str(tmp_path / "ok.png")]["status"] == "ok"


def test_bomb_over_pils_own_limit_is_a_reason_not_an_exception():
    # 20000 x 20000 is over twice Image.MAX_IMAGE_PIXELS: PIL itself raises at open.
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    probe = probe_image(bomb_png(20000, 20000), max_pixels=10**12)
    assert probe["status"] == "error" and probe["error"].startswith("decompression bomb")
    # Under PIL's warning limit but over ours: our cap decides, with the header's size.
    probe = probe_image(bomb_png(1200, 1000), max_pixels=1_000_000)
    assert probe["error"] == "decompression bomb: 1200 x 1000 > 1000000"
    assert (probe["width"], probe["height"]) == (1200, 1000)


def test_truncated_webp_is_truncated(image_bytes):
    data = image_bytes("webp", (64, 64), seed=3)
    assert probe_image(data, MAX_PIXELS)["status"] == "ok"
    assert probe_image(data[: len(data) // 2], MAX_PIXELS)["error"] == "truncated image"


# ---------------------------------------------------------------------------------------------
# Containers


def test_tar_offsets_read_back_the_member_bytes(tmp_path, image_bytes):
    tar_path = tmp_path / "shard-000.tar"
    members = {}
    long_key = "k" * 120  # over 100 characters: a PAX/GNU header, so data does not start at offset + 512
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, key in enumerate(["a", "b", long_key, "d"]):
            for name, data in [
                (f"{key}.jpg", image_bytes("jpg", (20 + i, 10), seed=i)),
                (f"{key}.json", b'{"x": 1}'),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                members[name] = data
    (unit,) = list_work_units([Source(uri=str(tar_path))], "pool", files_per_part=10)
    assert unit.kind == "tar"
    table = ingest_unit(unit, MAX_PIXELS, MAX_BYTES)
    images = {n: d for n, d in members.items() if n.endswith(".jpg")}
    assert table.num_rows == len(images)  # json sidecars are ignored, not errors
    for row in table.to_pylist():
        expected = images[row["member"]]
        assert row["uri"] == f"{tar_path}#{row['member']}" and row["status"] == "ok"
        data = read_image_bytes(row["kind"], row["path"], row["member"], row["offset"], row["size"])
        assert data == expected
        assert row["sha256"] == hashlib.sha256(expected).hexdigest()


def test_cut_tar_keeps_members_before_the_cut_and_records_the_tar(tmp_path, image_bytes):
    tar_path = tmp_path / "cut.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(4):
            data = image_bytes("png", (64, 64), seed=i)
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = tar_path.read_bytes()
    tar_path.write_bytes(whole[: int(len(whole) * 0.6)])
    table = ingest_unit(WorkUnit("pool", "tar", (str(tar_path),)), MAX_PIXELS, MAX_BYTES)
    rows = rows_by_uri(table)
    assert rows[str(tar_path)]["error"].startswith("unreadable")
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert 1 <= len(ok) < 4
    for r in ok:
        assert read_image_bytes("tar", r["path"], r["member"], r["offset"], r["size"]) == image_bytes(
            "png", (64, 64), seed=int(r["member"][0])
        )


@pytest.mark.parametrize("hf_struct", [False, True])
def test_parquet_round_trip(tmp_path, image_bytes, hf_struct):
    datas = [image_bytes("png", (16 + i, 16), seed=i) for i in range(5)]
    datas[3] = datas[3][:40]  # a corrupt row among good ones
    values: list = [*datas, None]
    if hf_struct:  # Hugging Face datasets' Image feature
        values = [None if d is None else {"bytes": d, "path": f"{i}.png"} for i, d in enumerate(values)]
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"img": values, "label": list(range(6))}), path, row_group_size=2)
    (unit,) = list_work_units([Source(uri=str(path), image_column="img")], "pool", files_per_part=10)
    table = ingest_unit(unit, MAX_PIXELS, MAX_BYTES)
    assert table.column("uri").to_pylist() == [f"{path}#row={i}" for i in range(6)]
    statuses = table.column("status").to_pylist()
    assert statuses == ["ok", "ok", "ok", "error", "ok", "error"]
    assert table.column("error").to_pylist()[5] == "missing bytes: null in 'img'"
    for row in table.to_pylist():
        if row["status"] == "ok":
            data = read_image_bytes("parquet", row["path"], row["member"], row["offset"], row["size"])
            assert data == datas[row["offset"]]
            assert row["sha256"] == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Listing sources and ids


def test_brace_patterns_globs_and_chunking(tmp_path, tiny_images):
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    tiny_images(tmp_path / "f" / "sub", 5)
    tiny_images(tmp_path / "f", 2, fmt="jpg")
    for i in (0, 2):
        with tarfile.open(tmp_path / f"s-{i:03d}.tar", "w"):
            pass
    sources = [
        Source(uri=str(tmp_path / "f")),
        Source(uri=str(tmp_path / "f" / "sub" / "*.png")),  # the same files again: listed once
        Source(uri=str(tmp_path / "s-{000..002}.tar")),  # s-001.tar is missing
    ]
    units = list_work_units(sources, "pool", files_per_part=3)
    files = sorted(str(p) for p in (tmp_path / "f").rglob("*") if p.is_file())
    assert [u.kind for u in units] == ["files", "files", "files", "tar", "tar", "tar"]
    assert [p for u in units[:3] for p in u.paths] == files
    assert [len(u.paths) for u in units[:3]] == [3, 3, 1]
    assert [u.paths[0] for u in units[3:]] == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert list_work_units(sources, "pool", files_per_part=3) == units  # deterministic
    missing = ingest_unit(units[4], MAX_PIXELS, MAX_BYTES)
    assert missing.num_rows == 1 and missing.column("error")[0].as_py().startswith(
        "unreadable: FileNotFoundError"
    )


def test_check_sources_names_the_bad_uri(tmp_path, tiny_images):
    tiny_images(tmp_path / "ok", 1)
    check_sources([Source(uri=str(tmp_path / "ok"))])
    with pytest.raises(SourceError, match="nope"):
        check_sources([Source(uri=str(tmp_path / "nope"))])
    with pytest.raises(SourceError, match="nothing matches"):
        check_sources([Source(uri=str(tmp_path / "ok" / "*.webp"))])
    with pytest.raises(SourceError, match="not a folder"):
        check_sources([Source(uri=str(tmp_path / "ok" / "0000.png"), kind="folder")])
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "p.parquet")
    with pytest.raises(SourceError, match="no column 'image'"):
        check_sources([Source(uri=str(tmp_path / "p.parquet"))])


def test_fsspec_memory_urls(image_bytes):
    fs = fsspec.filesystem("memory")
    data = [image_bytes("png", seed=i) for i in range(3)]
    for i, d in enumerate(data):
        fs.pipe(f"/lvd-test/imgs/{i}.png", d)
    try:
        (unit,) = list_work_units([Source(uri="memory://lvd-test/imgs")], "pool", files_per_part=10)
        table = ingest_unit(unit, MAX_PIXELS, MAX_BYTES)
        assert table.column("uri").to_pylist() == [f"memory:///lvd-test/imgs/{i}.png" for i in range(3)]
        assert table.column("sha256").to_pylist() == [hashlib.sha256(d).hexdigest() for d in data]
        row = table.to_pylist()[1]
        assert read_image_bytes(row["kind"], row["path"], None, None, None) == data[1]
    finally:
        fs.rm("/lvd-test", recursive=True)


def test_units_carry_their_source_root(nested_sources, tmp_path):
    from lvd.curation.ingest import list_work_units

    units = list_work_units(nested_sources, "pool", 4)
    deep, top = str(tmp_path / "deep"), str(tmp_path)
    by_first = {u.paths[0]: (u.root, u.root_label) for u in units}
    assert by_first[str(tmp_path / "s-00.tar")] == (top, tmp_path.name)  # the folder before the brace
    assert by_first[str(tmp_path / "t.parquet")] == (top, tmp_path.name)  # a literal file: its folder
    assert by_first[str(tmp_path / "loose" / "0000.png")] == (str(tmp_path / "loose"), "loose")  # glob
    assert {(u.root, u.root_label) for u in units if u.paths[0].startswith(deep + "/")} == {(deep, "deep")}


def test_root_labels_tell_apart_folders_named_alike():
    labels = root_labels(["/x/images", "/y/images", "/x/images", "/z/other", "/w/images"])
    assert labels == ["images", "images~2", "images", "other", "images~3"]
    # A source added at the end changes no earlier label.
    assert root_labels(["/x/images", "/y/images", "/q/images"])[:2] == labels[:2]


def test_ids_are_relative_to_the_source_root(tmp_path, tiny_images):
    """The same files under two different parent folders get the same ids; another root name or
    dataset, other ids."""
    from lvd.curation.ingest import list_work_units

    def ids(folder: Path, dataset: str = "pool") -> dict[str, int]:
        (unit,) = list_work_units([Source(uri=str(folder))], dataset, 100)
        table = ingest_unit(unit, MAX_PIXELS, MAX_BYTES)
        return dict(zip(table["sha256"].to_pylist(), table["image_id"].to_pylist(), strict=True))

    tiny_images(tmp_path / "a" / "pool", 3)
    tiny_images(tmp_path / "b" / "c" / "pool", 3)
    tiny_images(tmp_path / "b" / "other", 3)
    first = ids(tmp_path / "a" / "pool")
    assert len(set(first.values())) == 3
    assert ids(tmp_path / "b" / "c" / "pool") == first
    assert set(ids(tmp_path / "b" / "other").values()).isdisjoint(first.values())
    assert set(ids(tmp_path / "a" / "pool", "seed:s").values()).isdisjoint(first.values())
    assert id_key("/a/pool/x/1.png", "/a/pool", "pool") == "pool/x/1.png"
    assert id_key("/a/pool.tar#k.jpg", "/a", "a") == "a/pool.tar#k.jpg"
    assert id_key("/elsewhere/1.png", "/a/pool", "pool") == "/elsewhere/1.png"


def test_stable_ids_same_everywhere_distinct_across_uris():
    uris = [f"/data/img-{i}.jpg" for i in range(2000)]
    ids = [stable_image_id("pool", u) for u in uris]
    assert ids == [stable_image_id("pool", u) for u in uris]
    assert len(set(ids)) == len(ids) and all(0 <= i < 2**63 for i in ids)
    assert stable_image_id("seed:a", uris[0]) != ids[0]
    # Another interpreter (other hash seed) computes the same id.
    code = "from curation.ingest import stable_image_id; print(stable_image_id('pool', '/data/img-0.jpg'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == ids[0]


# ---------------------------------------------------------------------------------------------
# The Ray stage


def _spec(tmp_path: Path, files_per_part: int):
    return parse_job_spec(
        {
            "name": "ingest-test",
            "output_dir": str(tmp_path / "out"),
            "pool": [{"uri": str(tmp_path / "pool")}, {"uri": str(tmp_path / "shard.tar")}],
            "seeds": [{"name": "s", "strategy": "as_is", "sources": [{"uri": str(tmp_path / "seed")}]}],
            "eval_sets": [{"name": "e", "sources": [{"uri": str(tmp_path / "eval")}]}],
            "ingest": {"files_per_part": files_per_part},
            "embedding": {"retrieval": {"weights": "random"}},
            "ray": {"num_cpus": 2},
        }
    )


def test_stage_resumes_without_duplicates_and_recreates_a_lost_part(
    tmp_path, tiny_images, image_bytes, ray_local
):
    from lvd.jobs.stages import ingest as stage

    tiny_images(tmp_path / "pool", 5)
    (tmp_path / "pool" / "bad.jpg").write_bytes(b"")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i in range(3):
            data = image_bytes("jpg", seed=100 + i)
            info = tarfile.TarInfo(f"{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tiny_images(tmp_path / "seed", 2, seed=200)
    tiny_images(tmp_path / "eval", 1, seed=300)

    spec = _spec(tmp_path, files_per_part=2)
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=stage.STAGE)
    first = stage.run(ctx)
    # pool folder: 6 files in 3 parts; tar: 1 part; seed: 1; eval: 1
    assert first.parts == first.parts_written == 6
    assert (first.images, first.errors, first.pool_images, first.pool_errors) == (12, 1, 9, 1)
    assert first.errors_by_reason == {"empty file": 1}
    table = layout.read_table(ctx.out_dir, layout.IMAGES)
    ids = sorted(table.column("image_id").to_pylist())
    assert len(set(ids)) == 12
    datasets = table.column("dataset").to_pylist()
    assert (datasets.count("pool"), datasets.count("seed:s"), datasets.count("eval:e")) == (9, 2, 1)

    again = stage.run(ctx)
    assert again.parts_written == 0
    assert dataclasses.replace(again, parts_written=0) == dataclasses.replace(first, parts_written=0)
    assert sorted(layout.read_table(ctx.out_dir, layout.IMAGES).column("image_id").to_pylist()) == ids

    lost = layout.table_part(ctx.out_dir, layout.IMAGES, 1)
    before = pq.read_table(lost)
    lost.unlink()
    third = stage.run(ctx)
    assert third.parts_written == 1
    assert pq.read_table(lost).equals(before)
    assert sorted(layout.read_table(ctx.out_dir, layout.IMAGES).column("image_id").to_pylist()) == ids

    # Another plan (other chunking) must not resume the old parts: same rows, none twice.
    spec = _spec(tmp_path, files_per_part=4)
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=stage.STAGE)
    fourth = stage.run(ctx)
    assert fourth.parts == fourth.parts_written == 5
    assert sorted(layout.read_table(ctx.out_dir, layout.IMAGES).column("image_id").to_pylist()) == ids
    assert json.loads((ctx.stage_dir / layout.INGEST_PLAN).read_text())["units"] == 5


def test_ok_rows_decode_from_their_recorded_location(tmp_path, image_bytes):
    # What embed and shards do with the table: read the bytes back from kind/path/member/offset/size.
    data = image_bytes("png", (20, 20), seed=5)
    (tmp_path / "a.png").write_bytes(data)
    table = ingest_unit(WorkUnit("pool", "files", (str(tmp_path / "a.png"),)), MAX_PIXELS, MAX_BYTES)
    row = table.to_pylist()[0]
    img = Image.open(
        io.BytesIO(read_image_bytes(row["kind"], row["path"], row["member"], row["offset"], row["size"]))
    )
    assert img.size == (row["width"], row["height"])
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(data))))


def test_mangled_images_never_raise(image_bytes):
    """Random byte damage to every format: always a result, never an exception out of probe_image."""
    rng = np.random.default_rng(0)
    originals = [
        image_bytes(fmt, (24, 20), seed=i)
        for i, fmt in enumerate(["jpg", "png", "gif", "bmp", "webp", "tiff"])
    ]
    assert all(probe_image(d, MAX_PIXELS)["status"] == "ok" for d in originals)
    statuses = set()
    for k in range(300):
        data = bytearray(originals[k % len(originals)])
        if k % 2:
            data = data[: int(rng.integers(1, len(data) + 1))]
        for pos in rng.integers(0, len(data), int(rng.integers(0, 6))):
            data[pos] = int(rng.integers(0, 256))
        probe = probe_image(bytes(data), MAX_PIXELS)
        assert probe["status"] in ("ok", "error") and (probe["status"] == "ok") == (probe["error"] is None)
        statuses.add(probe["status"])
    assert "error" in statuses


# ---------------------------------------------------------------------------------------------
# Listing on workers: the same units as the serial listing


def _serial_units(sources: list[Source], dataset: str, files_per_part: int) -> list[WorkUnit]:
    """The listing as it was before it ran on workers: one `find` per folder, in this process."""
    from lvd.curation.ingest import _canonical, _exists, _kind_of, _missing_kind, _pattern_matches

    def folder_files(match):
        # Every entry that is not hidden and not a folder walked into: files, symlinks, FIFOs.
        files = []
        for fs_path, info in match.fs.find(match.fs_path, withdirs=False, detail=True).items():
            if not Path(fs_path).name.startswith(".") and (
                info.get("type") != "directory" or info.get("islink")
            ):
                files.append(_canonical(match.fs, fs_path))
        return sorted(files)

    seen: set[str] = set()
    units, loose = [], []

    def fresh(paths):
        new = [p for p in paths if p not in seen]
        seen.update(new)
        return new

    def chunks(paths):
        return [tuple(paths[i : i + files_per_part]) for i in range(0, len(paths), files_per_part)]

    for src in sources:
        for match in [m for p in expand_braces(src.uri) for m in _pattern_matches(p)]:
            kind = _kind_of(match, src.kind) if _exists(match) else _missing_kind(match, src.kind)
            if kind == "folder":
                files = fresh(folder_files(match))
                units += [WorkUnit(dataset, "files", c) for c in chunks(files)]
            elif kind in ("tar", "parquet"):
                if fresh([match.path]):
                    units.append(WorkUnit(dataset, kind, (match.path,), src.image_column))
            elif kind == "file":
                loose += fresh([match.path])
    return units + [WorkUnit(dataset, "files", c) for c in chunks(sorted(loose))]


def _rootless(units: list[WorkUnit]) -> list[WorkUnit]:
    """Units without their id roots (tested on their own in test_ids_are_relative_to_the_source_root)."""
    return [dataclasses.replace(u, root="", root_label="") for u in units]


@pytest.fixture
def nested_sources(tmp_path, tiny_images, image_bytes):
    """A deep folder (hidden files and folders, sidecars, symlinks, names that sort across levels),
    tars by a brace pattern with one missing, a glob overlapping the folder, a parquet, loose files."""
    root = tmp_path / "deep"
    for k, sub in enumerate(["a", "a-b", "a/x", "a/x/y/z", "b", ".hidden", "c/d/e/f/g", "c/d/e2"]):
        tiny_images(root / sub, 1 + k % 3, seed=10 * k)
    tiny_images(root, 2, fmt="jpg", seed=99)  # files at the top level, beside the folders
    (root / "a.png").write_bytes(image_bytes("png", seed=98))  # sorts between a-b/ and a/
    (root / "a" / ".secret.png").write_bytes(image_bytes("png", seed=97))  # hidden: not listed
    (root / "a" / "x" / "meta.json").write_text("{}")  # sidecar: not an image
    os.symlink(root / "b", root / "c" / "link-to-b")  # a folder symlink: not followed
    os.symlink(tmp_path / "gone.png", root / "c" / "broken.png")  # a broken one: a row
    (root / "empty" / "deeper").mkdir(parents=True)
    for i in (0, 1, 3):
        with tarfile.open(tmp_path / f"s-{i:02d}.tar", "w"):
            pass
    pq.write_table(pa.table({"image": [image_bytes("png", seed=5)]}), tmp_path / "t.parquet")
    tiny_images(tmp_path / "loose", 3, seed=50)
    return [
        Source(uri=str(root)),
        Source(uri=str(root / "a" / "x" / "*.png")),  # listed again: once only
        Source(uri=str(tmp_path / "s-{00..03}.tar")),  # s-02.tar is missing: a unit all the same
        Source(uri=str(tmp_path / "t.parquet")),
        Source(uri=str(tmp_path / "loose" / "*.png")),
        Source(uri=str(root / "a"), kind="folder"),  # listed again under another kind: nothing new
    ]


def test_listing_split_over_tasks_gives_the_serial_units(nested_sources, tmp_path, monkeypatch):
    from lvd.curation.ingest import list_folder_level, list_folder_tree, map_in_process, plan_work_units

    expected = _serial_units(nested_sources, "pool", files_per_part=4)
    assert [u.kind for u in expected].count("tar") == 4 and expected[-1].paths[0].startswith(
        str(tmp_path / "loose")
    )
    calls: dict[str, int] = {}

    def counting(fn, groups):
        calls[fn.__name__] = calls.get(fn.__name__, 0) + len(groups)
        return map_in_process(fn, groups)

    for parallelism in (1, 2, 8, 64):  # more parallelism: folders split into more, deeper subtrees
        calls.clear()
        units = list_work_units(nested_sources, "pool", 4, mapper=counting, parallelism=parallelism)
        assert _rootless(units) == expected, parallelism
        assert calls.get(list_folder_level.__name__, 0) >= 1
    assert calls[list_folder_tree.__name__] > 1  # subtrees went to several tasks

    # Several datasets in one plan: the same as listing each on its own, in set order.
    sets = [SourceSet("pool", nested_sources[:3]), SourceSet("seed:s", nested_sources[2:])]
    assert _rootless(plan_work_units(sets, 4, parallelism=4)) == (
        _serial_units(nested_sources[:3], "pool", 4) + _serial_units(nested_sources[2:], "seed:s", 4)
    )


def test_listing_on_ray_workers_gives_the_serial_units(nested_sources, ray_local):
    from lvd.curation.ingest import plan_work_units
    from lvd.jobs.stages.ingest import ray_mapper

    expected = _serial_units(nested_sources, "eval:e", files_per_part=3)
    units = plan_work_units([SourceSet("eval:e", nested_sources)], 3, mapper=ray_mapper, parallelism=4)
    assert _rootless(units) == expected


def test_plan_fingerprint_is_the_json_of_the_plan(tmp_path, tiny_images):
    from lvd.jobs.stages.ingest import _plan_fingerprint, plan_units

    tiny_images(tmp_path / "pool", 5)
    spec = _spec(tmp_path, files_per_part=2).model_copy(update={"seeds": [], "eval_sets": []})
    spec = spec.model_copy(update={"pool": [Source(uri=str(tmp_path / "pool"))]})
    units = plan_units(spec)
    blob = json.dumps(
        {
            "units": [u.to_dict() for u in units],
            "max_pixels": spec.ingest.max_pixels,
            "max_bytes": spec.ingest.max_bytes,
            "min_side": spec.ingest.min_side,
            "max_aspect_ratio": spec.ingest.max_aspect_ratio,
        },
        sort_keys=True,
    )  # how the fingerprint was computed before it was fed unit by unit: resumes keep their parts
    assert _plan_fingerprint(units, spec) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert (
        _plan_fingerprint([], spec)
        == hashlib.sha256(
            json.dumps(
                {
                    "units": [],
                    "max_pixels": 89_478_485,
                    "max_bytes": 64 << 20,
                    "min_side": 32,
                    "max_aspect_ratio": 20.0,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
    )


def test_stage_rejects_a_missing_source_by_name_before_any_part(tmp_path, tiny_images, ray_local):
    from lvd.jobs.stages import ingest as stage

    tiny_images(tmp_path / "pool", 2)
    tiny_images(tmp_path / "eval", 1)
    (tmp_path / "shard.tar").write_bytes(b"")
    spec = _spec(tmp_path, files_per_part=2)  # no seed folder
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=stage.STAGE)
    with pytest.raises(SourceError, match=r"seed set 's' source '.*/seed': no such file or folder"):
        stage.run(ctx)
    assert not layout.list_parts(ctx.stage_dir)


def test_stage_names_a_seed_set_with_no_readable_image_after_writing_its_parts(
    tmp_path, tiny_images, ray_local
):
    from lvd.jobs.stages import ingest as stage

    tiny_images(tmp_path / "pool", 2)
    tiny_images(tmp_path / "eval", 1)
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "a.jpg").write_bytes(b"")
    (tmp_path / "seed" / "b.png").write_bytes(b"not a png")
    with tarfile.open(tmp_path / "shard.tar", "w"):
        pass
    spec = _spec(tmp_path, files_per_part=2)
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=stage.STAGE)
    with pytest.raises(
        stage.NoReadableImages, match=r"^seed set 's': none of its 2 files is a readable image"
    ):
        stage.run(ctx)
    table = layout.read_table(ctx.out_dir, layout.IMAGES)  # the reasons are there to read
    seed = {r["uri"]: r["error"] for r in table.to_pylist() if r["dataset"] == "seed:s"}
    assert seed == {
        str(tmp_path / "seed" / "a.jpg"): "empty file",
        str(tmp_path / "seed" / "b.png"): "not an image",
    }
