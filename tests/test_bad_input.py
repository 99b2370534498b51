"""Bad input, kind by kind: each file of a folder of every kind gets one row with the status and reason
its kind must get, nothing under a source goes uncounted, and nothing raises.

One ingest run (listing + every work unit, in one child process) is shared by the table-driven tests.
When the tests run as root, the child runs without the capabilities that let root read any file
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, dropped with util-linux's setpriv), so the chmod-000 file
gives a real EACCES, not a simulated one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageCms, ImageOps

from lvd.curation.image_io import IMAGE_FORMATS, SHARD_IMAGE_EXTENSIONS, read_image_bytes
from lvd.curation.ingest import SourceError, SourceSet, plan_work_units, probe_image, reason_prefix
from lvd.jobs.demo import bomb_png
from lvd.jobs.stages.ingest import NoReadableImages, _merge, check_readable, summarize_part
from lvd.schemas.job_spec import Source

MAX_PIXELS = 1_000_000
MAX_BYTES = 200_000
MIN_SIDE = 32
MAX_ASPECT = 20.0
DROP_DAC = "-dac_override,-dac_read_search"
CAN_DENY = os.geteuid() != 0 or shutil.which("setpriv") is not None
ORIENTATIONS = range(1, 9)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    """Four flat quadrants in distinct colours plus noise: any flip or turn changes it."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8)
    for k, (ys, xs) in enumerate(
        [(slice(0, h // 2), slice(0, w // 2)), (slice(0, h // 2), slice(w // 2, w)),
         (slice(h // 2, h), slice(0, w // 2)), (slice(h // 2, h), slice(w // 2, w))]
    ):  # fmt: skip
        arr[ys, xs] = [(230, 20, 20), (20, 200, 20), (20, 20, 230), (230, 230, 30)][k]
    arr = np.clip(arr.astype(int) + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# ImageOps.exif_transpose's transform per orientation; the stored picture gets the inverse, so every
# orientation displays the same picture once applied.
_UNDO = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def oriented_jpeg(orientation: int) -> bytes:
    stored = picture() if orientation == 1 else picture().transpose(_UNDO[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif)


def animated(fmt: str) -> bytes:
    frames = [picture(seed=i) for i in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def cmyk_with_icc() -> bytes:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(picture().convert("CMYK"), "JPEG", icc_profile=icc)


def fake_heic() -> bytes:
    # An ISO-BMFF 'ftyp' box with the HEIC brand, as an iPhone photo starts; Pillow has no HEIF decoder.
    return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)


def tar_bytes(members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:  # a symlink member
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# name in the pool folder -> (bytes, status, reason prefix or None, format or None). Every file is
# written by `build_tree`; special files (links, FIFO, locked, odd names) are added there.
def folder_kinds() -> dict[str, tuple[bytes, str, str | None, str | None]]:
    good = picture()
    jpeg = encode(good, "JPEG")
    png = encode(good, "PNG")
    webp = encode(good, "WEBP")
    kinds = {
        "good.png": (png, "ok", None, "png"),
        # Kinds ingest already had
        "empty.jpg": (b"", "error", "empty file", None),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "error", "truncated image", None),
        "cut.png": (png[: len(png) // 2], "error", "truncated image", None),
        "cut.webp": (webp[: len(webp) // 2], "error", "truncated image", None),
        "text-named.jpg": (b"plain text, not a JPEG\n" * 8, "error", "not an image", None),
        "bomb.png": (bomb_png(2000, 1000), "error", "decompression bomb", None),
        "huge.png": (encode(picture(400, 400, seed=1), "PNG"), "error", "too large", None),
        # Aspect-ratio bomb: a few hundred bytes whose resize would ask for 256 x 15,360,000 pixels.
        "sliver.png": (bomb_png(1, 60000), "error", "extreme aspect ratio", None),
        "small.png": (encode(picture(20, 40), "PNG"), "error", "too small", None),
        "animated.gif": (animated("GIF"), "ok", None, "gif"),
        "animated.png": (animated("PNG"), "ok", None, "png"),
        "animated.apng": (animated("PNG"), "ok", None, "png"),
        "animated.webp": (animated("WEBP"), "ok", None, "webp"),
        "pages.tif": (animated("TIFF"), "ok", None, "tiff"),  # a multi-page TIFF
        "photo.avif": (encode(good, "AVIF"), "ok", None, "avif"),
        "photo.heic": (fake_heic(), "error", "unsupported format", None),
        "photo.jfif": (jpeg, "ok", None, "jpeg"),
        "png-content.xyz": (png, "ok", None, "png"),  # unknown extension, decodable content
        "no-extension": (jpeg, "ok", None, "jpeg"),
        "labels.json": (b'{"label": 3}', "error", "not an image", None),  # a sidecar is counted
        "picture.ppm": (encode(good, "PPM"), "error", "unsupported format", None),
        "gray16.tif": (
            encode(Image.fromarray(np.arange(1920, dtype=np.uint16).reshape(40, 48) * 34), "TIFF"),
            "ok",
            None,
            "tiff",
        ),  # fmt: skip
        "float.tif": (
            encode(Image.fromarray(np.linspace(0, 1, 1920, dtype=np.float32).reshape(40, 48), "F"), "TIFF"),
            "ok",
            None,
            "tiff",
        ),  # fmt: skip
        "cmyk-icc.jpg": (cmyk_with_icc(), "ok", None, "jpeg"),
        "bilevel.png": (encode(good.convert("1"), "PNG"), "ok", None, "png"),
        "bilevel.tif": (encode(good.convert("1"), "TIFF"), "ok", None, "tiff"),
        "shards.tar": (tar_bytes([("a.png", png)]), "error", "unsupported format", None),
        "locked.png": (png, "error", "unreadable", None),  # chmod 000 in build_tree
    }
    for o in ORIENTATIONS:
        kinds[f"orientation-{o}.jpg"] = (oriented_jpeg(o), "ok", None, "jpeg")
    return kinds


# Special entries of the pool folder: name -> (status, reason prefix)
SPECIAL = {
    "broken.png": ("error", "unreadable"),  # a symlink to nothing
    "loop.png": ("error", "unreadable"),  # a symlink to itself
    "loop-a.png": ("error", "unreadable"),  # two symlinks to each other
    "loop-b.png": ("error", "unreadable"),
    "fifo.jpg": ("error", "unreadable"),  # reading it would block forever
    "folder-link": ("error", "unreadable"),  # a symlink to a folder: not followed
    "caf\\xe9.png": ("error", "unsafe name"),  # the name's bytes are not UTF-8
}

# Members of a tar source: name -> (status, reason prefix); uris are tar#name.
TAR_MEMBERS = {
    "../escape.png": ("error", "unsafe name"),
    "/etc/absolute.png": ("error", "unsafe name"),
    "./dot-slash.png": ("ok", None),
    "key.with.dots.png": ("ok", None),
    "twice.png": ("ok", None),
    "twice.png@": ("error", "duplicate name"),  # the second member of that name (uri gets @offset)
    "link.png": ("error", "unreadable"),
    "cut.png": ("error", "truncated image"),
    "label.json": None,  # a WebDataset sidecar: not an image member, no row
}

# Parquet rows of images.parquet: row -> (status, reason prefix)
PARQUET_ROWS = {
    0: ("ok", None),
    1: ("error", "missing bytes"),  # null
    2: ("error", "too large"),
    3: ("error", "truncated image"),
    4: ("ok", None),
}


def build_tree(root: Path) -> dict:
    """Every kind under `root`; returns what each source is."""
    pool = root / "pool"
    pool.mkdir(parents=True)
    kinds = folder_kinds()
    for name, (data, *_rest) in kinds.items():
        (pool / name).write_bytes(data)
    (pool / "locked.png").chmod(0)
    os.symlink(root / "gone.png", pool / "broken.png")
    os.symlink("loop.png", pool / "loop.png")
    os.symlink("loop-b.png", pool / "loop-a.png")
    os.symlink("loop-a.png", pool / "loop-b.png")
    os.mkfifo(pool / "fifo.jpg")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "x.png").write_bytes(encode(picture(), "PNG"))
    os.symlink(root / "elsewhere", pool / "folder-link")
    with open(os.fsencode(pool) + b"/caf\xe9.png", "wb") as f:
        f.write(encode(picture(), "PNG"))
    (pool / ".hidden.png").write_bytes(encode(picture(), "PNG"))  # hidden: not part of the source

    png = encode(picture(seed=3), "PNG")
    members = [
        (name.rstrip("@"), png if name != "cut.png" else png[:100])
        for name in TAR_MEMBERS
        if name not in ("link.png", "label.json")
    ] + [("link.png", None), ("label.json", b"{}")]
    (root / "members.tar").write_bytes(tar_bytes(members))

    big = encode(picture(400, 400, seed=2), "PNG")
    assert len(big) > MAX_BYTES
    rows = [png, None, big, png[:100], encode(picture(seed=4), "JPEG")]
    pq.write_table(pa.table({"image": pa.array(rows, pa.binary())}), root / "images.parquet")
    pq.write_table(pa.table({"image": pa.array([1, 2, 3], pa.int64())}), root / "wrong-type.parquet")

    (root / "seed").mkdir()
    (root / "seed" / "empty.jpg").write_bytes(b"")
    (root / "seed" / "notes.txt").write_text("no image here")
    return {"kinds": kinds}


CHILD = """
import json, sys, pyarrow as pa, pyarrow.parquet as pq
from lvd.curation.ingest import SourceSet, ingest_unit, plan_work_units
from lvd.schemas.job_spec import Source
root, out = sys.argv[1], sys.argv[2]
sets = [
    SourceSet("pool", [
        Source(uri=root + "/pool"),
        Source(uri=root + "/pool/*.png"),  # the same files again: one row each
        Source(uri="file://" + root + "/pool/good.png"),  # and again, spelled as a URL
        Source(uri=root + "/members.tar"),
        Source(uri=root + "/images.parquet"),
        Source(uri=root + "/wrong-type.parquet"),
    ]),
    SourceSet("seed:empty", [Source(uri=root + "/seed")], "seed set 'empty' source"),
]
units = plan_work_units(sets, files_per_part=16)
limits = json.loads(sys.argv[3])
pq.write_table(pa.concat_tables([ingest_unit(u, **limits) for u in units]), out)
"""
LIMITS = {
    "max_pixels": MAX_PIXELS,
    "max_bytes": MAX_BYTES,
    "min_side": MIN_SIDE,
    "max_aspect_ratio": MAX_ASPECT,
}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """(data root, images table, what was built) of one ingest over every kind, in a child process
    that file permissions bind."""
    root = tmp_path_factory.mktemp("bad-input")
    info = build_tree(root / "data")
    command = [
        sys.executable,
        "-c",
        CHILD,
        str(root / "data"),
        str(root / "images.parquet"),
        json.dumps(LIMITS),
    ]
    if os.geteuid() == 0 and CAN_DENY:
        command = ["setpriv", f"--inh-caps={DROP_DAC}", f"--bounding-set={DROP_DAC}", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=180)  # a blocked read fails
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield root / "data", pq.read_table(root / "images.parquet"), info
    finally:
        (root / "data" / "pool" / "locked.png").chmod(0o644)


def _by_uri(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    by_uri = {r["uri"]: r for r in rows}
    assert len(by_uri) == len(rows), "a uri has two rows"
    return by_uri


@pytest.mark.parametrize("name", sorted(folder_kinds()))
def test_every_folder_kind_gets_its_status_and_reason(shared_run, name):
    data_root, table, info = shared_run
    data, status, reason, fmt = info["kinds"][name]
    row = _by_uri(table)[str(data_root / "pool" / name)]
    assert row["status"] == status, (name, row["error"])
    if reason is None:
        assert row["error"] is None and row["format"] == fmt
    else:
        assert reason_prefix(row["error"]) == reason, (name, row["error"])
    if name == "locked.png":
        if not CAN_DENY:
            pytest.skip("running as root and util-linux setpriv is missing: root reads a chmod-000 file")
        assert "PermissionError" in row["error"]


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_entries_are_rows_not_crashes(shared_run, name):
    data_root, table, _ = shared_run
    status, reason = SPECIAL[name]
    row = _by_uri(table)[str(data_root / "pool" / name)]
    assert (row["status"], reason_prefix(row["error"])) == (status, reason), row["error"]


def test_notes_flag_animated_and_oriented_images(shared_run):
    data_root, table, _ = shared_run
    rows = _by_uri(table)
    for name in ("animated.gif", "animated.png", "animated.apng", "animated.webp"):
        assert rows[str(data_root / "pool" / name)]["note"] == "animated: 3 frames, the first is used"
    for o in ORIENTATIONS:
        row = rows[str(data_root / "pool" / f"orientation-{o}.jpg")]
        # Recorded as displayed: orientations 5-8 store the picture turned a quarter.
        assert (row["width"], row["height"]) == (48, 40), o
        assert row["note"] == (None if o == 1 else f"exif orientation: {o}, applied when decoding")
    assert rows[str(data_root / "pool" / "pages.tif")]["note"] == "multi-frame: 3 frames, the first is used"
    assert rows[str(data_root / "pool" / "good.png")]["note"] is None


def test_aspect_ratio_bomb_is_rejected_from_the_header(shared_run):
    data_root, table, _ = shared_run
    row = _by_uri(table)[str(data_root / "pool" / "sliver.png")]
    # Its pixel data is 64 zero bytes: had it been decoded, the reason would be a truncated image.
    assert row["error"] == "extreme aspect ratio: 1 x 60000 (60000.0:1 > 20:1)"
    assert (row["width"], row["height"]) == (1, 60000)


def test_tar_member_names(shared_run):
    data_root, table, _ = shared_run
    tar = str(data_root / "members.tar")
    rows = {r["member"] + ("@" if "@" in r["uri"] else ""): r for r in table.to_pylist() if r["path"] == tar}
    assert set(rows) == {n for n, v in TAR_MEMBERS.items() if v is not None}
    for name, (status, reason) in ((n, v) for n, v in TAR_MEMBERS.items() if v is not None):
        row = rows[name]
        assert row["status"] == status and (reason is None or reason_prefix(row["error"]) == reason), row
        if status == "ok":  # read back by offset, whatever the name
            data = read_image_bytes("tar", tar, row["member"], row["offset"], row["size"])
            assert probe_image(data, MAX_PIXELS)["status"] == "ok"


def test_parquet_rows_and_a_column_of_the_wrong_type(shared_run):
    data_root, table, _ = shared_run
    path = str(data_root / "images.parquet")
    rows = _by_uri(table)
    for i, (status, reason) in PARQUET_ROWS.items():
        row = rows[f"{path}#row={i}"]
        assert row["status"] == status and (reason is None or reason_prefix(row["error"]) == reason), row
    assert rows[f"{path}#row=2"]["size"] > MAX_BYTES
    wrong = str(data_root / "wrong-type.parquet")
    for i in range(3):  # every row counted, each with the reason
        assert rows[f"{wrong}#row={i}"]["error"].startswith("wrong column type: 'image' is int64")


def test_nothing_uncounted_and_no_uri_twice(shared_run):
    """Every entry under the folder (but hidden ones) is a row; the same file named by three sources is
    one row; the summary's counts are the rows' reasons."""
    data_root, table, info = shared_run
    pool = data_root / "pool"
    entries = sorted(os.fsencode(e) for e in os.listdir(os.fsencode(pool)) if not e.startswith(b"."))
    assert len(entries) == len(info["kinds"]) + len(SPECIAL)
    pool_rows = [r for r in table.to_pylist() if r["path"].startswith(str(pool))]
    assert len(pool_rows) == len(entries)  # one each: good.png is named by three sources
    assert len(set(table.column("image_id").to_pylist())) == table.num_rows
    expected_rows = len(entries) + (len(TAR_MEMBERS) - 1) + len(PARQUET_ROWS) + 3 + 2  # + seed files
    assert table.num_rows == expected_rows
    summary = _merge([summarize_part(table)])
    errors = Counter(reason_prefix(e) for e in table.column("error").to_pylist() if e)
    assert summary["errors_by_reason"] == dict(errors) and summary["errors"] == sum(errors.values())
    assert summary["notes"] == {"animated": 4, "exif orientation": 7, "multi-frame": 1}
    assert summary["images"] == table.num_rows


def test_a_seed_set_without_one_readable_image_is_an_error_naming_it(shared_run):
    data_root, table, _ = shared_run
    summary = _merge([summarize_part(table)])
    assert summary["by_dataset"]["seed:empty"] == {"images": 2, "errors": 2}
    sets = [SourceSet("pool", [Source(uri="p")], "pool source"),
            SourceSet("seed:empty", [Source(uri="s")], "seed set 'empty' source")]  # fmt: skip
    with pytest.raises(NoReadableImages, match=r"seed set 'empty': none of its 2 files is a readable image"):
        check_readable(summary["by_dataset"], sets)
    check_readable(summary["by_dataset"], sets[:1])  # the pool has good images


def test_a_source_that_matches_nothing_fails_before_work_naming_it(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.png").write_bytes(encode(picture(), "PNG"))
    sets = [
        SourceSet(
            "pool",
            [Source(uri=str(tmp_path / "pool")), Source(uri=str(tmp_path / "nope-*.tar"))],
            "pool source",
        )
    ]
    with pytest.raises(SourceError, match=r"pool source '.*nope-\*\.tar': no such file or folder"):
        plan_work_units(sets, files_per_part=4)


def test_decoding_applies_orientation_and_scales_deep_images():
    """What embed and training see: all 8 orientations give one picture; 16-bit and float TIFFs scale."""
    from lvd.embeddings.preprocess import decode_image, to_rgb
    from lvd.training.data.loader import decode_image as decode_sample

    want = np.asarray(picture(), dtype=int)
    for o in ORIENTATIONS:
        data = oriented_jpeg(o)
        for got in (to_rgb(decode_image(data)), decode_sample({"__key__": "k", "jpg": data})):
            assert got.size == (48, 40)
            assert np.abs(np.asarray(got, dtype=int) - want).mean() < 12, o  # a wrong turn: ~100
    deep = np.full((40, 48), 65535, np.uint16)
    deep[:, :24] = 0
    out = np.asarray(decode_sample({"__key__": "k", "tif": encode(Image.fromarray(deep), "TIFF")}))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, -1].tolist() == [255, 255, 255]
    flt = np.full((40, 48), 1.0, np.float32)
    flt[:, :24] = 0.0
    out = np.asarray(decode_sample({"__key__": "k", "tif": encode(Image.fromarray(flt, "F"), "TIFF")}))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, -1].tolist() == [255, 255, 255]
    assert ImageOps.exif_transpose is not None


def test_every_accepted_format_has_an_extension_the_shard_readers_know():
    from lvd.jobs import shard_verify
    from lvd.jobs.shard_writer import image_extension
    from lvd.training.data import loader

    for fmt in IMAGE_FORMATS:
        ext = image_extension(fmt.lower())
        assert ext in SHARD_IMAGE_EXTENSIONS and ext in loader.IMAGE_EXTENSIONS, fmt
        assert ext in shard_verify.IMAGE_EXTENSIONS, fmt
    avif = encode(picture(), "AVIF")
    assert loader.decode_image({"__key__": "k", "avif": avif}).size == (48, 40)


PARQUET_MEMORY = """
import sys, pyarrow as pa
from lvd.curation.ingest import WorkUnit, ingest_unit
pool = pa.default_memory_pool()
t = ingest_unit(WorkUnit("pool", "parquet", (sys.argv[1],)), 10**9, int(sys.argv[2]))
print(pool.max_memory(), t.num_rows, sum(e is not None for e in t.column("error").to_pylist()))
"""


def test_parquet_max_bytes_holds_without_reading_a_row_group_into_memory(tmp_path):
    """40 incompressible 100 KB images in one 4 MB row group of 256 KB pages: Arrow's peak memory stays
    near one page, not the row group (a fresh process, so the pool's peak is this read's). A page is
    the least a parquet reader can hold; how big pages are is the writer's choice."""
    rng = np.random.default_rng(0)
    blobs = [encode(Image.fromarray(rng.integers(0, 256, (180, 180, 3), dtype=np.uint8)), "PNG")
             for _ in range(40)]  # fmt: skip
    size = len(blobs[0])
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({"image": pa.array(blobs, pa.binary())}),
        path,
        row_group_size=100,
        compression="none",
        use_dictionary=False,
        write_batch_size=1,
        data_page_size=1 << 18,
    )
    group = pq.ParquetFile(path).metadata.row_group(0).total_byte_size
    out = subprocess.run(
        [sys.executable, "-c", PARQUET_MEMORY, str(path), str(size // 2)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    peak, rows, errors = (int(v) for v in out)
    assert (rows, errors) == (40, 40)  # every image over max_bytes: counted, each "too large"
    assert peak < group / 3, (peak, group)
