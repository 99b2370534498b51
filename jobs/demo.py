"""An offline demo: a generated image pool with planted duplicates and bad files, and its job spec.

`build_demo(out)` writes, deterministically for a given (n_images, seed):
  out/data/pool/folder/...          part of the pool as plain files (class sub-folders)
  out/data/pool/pool-{000..001}.tar part as WebDataset shards (image + json sidecar per key)
  out/data/pool/pool.parquet        part as parquet with an `image` bytes column
  out/data/seeds/<name>/            seed sets (SEED_SETS: sample, cluster and as_is strategies)
  out/data/eval/holdout/            eval set: near-duplicates of pool images (for eval-overlap dedup)
  out/data/labelled/{train,val}/    a labelled set of the 8 classes in grey, for `lvd eval knn`
  out/data/manifest.json            what was planted (written last: its presence means complete)
  out/job.yaml                      the job spec (paths relative to out/)

Images come from 8 procedural classes (shapes, stripes, textures, palettes) with per-image
randomness, each pattern the subject of a scene with its own backdrop (`generate_scene`), class
frequencies deliberately unbalanced (the long tail that balanced sampling is for). Planted: ~5%
exact byte copies, ~5% copies by realistic edits (`realistic_copy`: rescale, trim, colour jitter,
text, logo, flip, then JPEG), corrupt files (empty, truncated JPEG/PNG, text named .jpg, a
decompression bomb) and valid odd modes (CMYK JPEG, 16-bit PNG). Dedup compares the built-in copy
detector's vectors (`arch: copy_descriptor`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw

from lvd.embeddings import copy_descriptor

GENERATOR_VERSION = 4  # of the data and of the job spec written with it (a built demo keeps its spec)

LABELLED_PER_CLASS = 12  # train images per class of data/labelled (val: half as many)
CLASS_NAMES = ("discs", "stripes", "checker", "rings", "polygons", "blobs", "grid", "sunburst")
# Unbalanced on purpose: the head classes dominate the pool, the tail ones are rare.
CLASS_WEIGHTS = np.array([0.26, 0.2, 0.15, 0.11, 0.09, 0.08, 0.06, 0.05])
# (hue centre in [0, 1), hue spread) of each class's palette.
Colours = Literal["class", "random", "grey"]
COLOURS: tuple[str, ...] = get_args(Colours)
CLASS_HUES = (
    (0.0, 0.05),
    (0.6, 0.06),
    (0.33, 0.06),
    (0.15, 0.04),
    (0.78, 0.05),
    (0.08, 0.04),
    (0.5, 0.04),
    (0.9, 0.04),
)

SEED_SETS = {
    # name: (strategy, classes, count, extra spec fields)
    "tail_sample": ("sample", (6, 7), 40, {"k": 4}),
    "blobs_cluster": (
        "cluster",
        (5,),
        15,
        {"min_seed_images": 3, "images_per_cluster": 20, "max_images": 60},
    ),
    "rings_as_is": ("as_is", (3,), 5, {}),
}
EVAL_NEAR_DUPLICATES = 10
MIN_IMAGES = 40


# ---------------------------------------------------------------------------------------------
# Procedural classes


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1]; arrays broadcast, last axis of the result is RGB."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(np.broadcast(h, s, v).shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        mask = i == k
        for c, comp in enumerate((r, g, b)):
            out[..., c] = np.where(mask, np.broadcast_to(comp, mask.shape), out[..., c])
    return out


def _palette(rng: np.random.Generator, label: int, n: int, colours: str = "class") -> np.ndarray:
    centre, spread = CLASS_HUES[label]
    if colours != "class":  # same hue spread around a random centre: colour says nothing of the class
        centre = rng.uniform(0.0, 1.0)
    h = centre + rng.uniform(-spread, spread, n)
    s = rng.uniform(0.5, 1.0, n)
    v = rng.uniform(0.45, 1.0, n)
    return _hsv_to_rgb(h, s, v)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Random values on a cells x cells grid, bicubic-upsampled to h x w, in [-1, 1]."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float64) / 127.5 - 1.0


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy / max(h, w), xx / max(h, w)


def _two_tone(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], colours[0], colours[1])


def _discs(rng, h, w, colours):
    img = Image.new("RGB", (w, h), tuple(int(c) for c in (colours[0] * 90)))
    draw = ImageDraw.Draw(img)
    for c in colours[1 + rng.integers(0, 2, 16)]:
        r = rng.uniform(0.04, 0.11) * min(h, w)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in c * 255))
    return np.asarray(img, dtype=np.float64) / 255


def _stripes(rng, h, w, colours):
    yy, xx = _coords(h, w)
    angle = rng.uniform(-0.3, 0.3)
    freq = rng.uniform(14, 22)
    phase = np.sin(2 * np.pi * (freq * (yy * np.cos(angle) + xx * np.sin(angle))) + rng.uniform(0, 6.3))
    return _two_tone(phase > 0, colours)


def _checker(rng, h, w, colours):
    yy, xx = _coords(h, w)
    angle = rng.uniform(0, np.pi / 2)
    cell = rng.uniform(0.04, 0.07)
    u = (xx * np.cos(angle) - yy * np.sin(angle)) / cell
    v = (xx * np.sin(angle) + yy * np.cos(angle)) / cell
    return _two_tone((np.floor(u) + np.floor(v)) % 2 == 0, colours)


def _rings(rng, h, w, colours):
    yy, xx = _coords(h, w)
    cy, cx = rng.uniform(0.1, 0.9, 2) * np.array([h, w]) / max(h, w)
    r = np.hypot(yy - cy, xx - cx)
    return _two_tone(np.sin(2 * np.pi * rng.uniform(12, 18) * r) > 0, colours)


def _polygons(rng, h, w, colours):
    img = Image.new("RGB", (w, h), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for c in colours[rng.integers(0, len(colours), 12)]:
        n = int(rng.integers(3, 5))
        cx, cy, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.2) * min(h, w)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        pts = [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a in ang]
        draw.polygon(pts, fill=tuple(int(v) for v in c * 255))
    return np.asarray(img, dtype=np.float64) / 255


def _blobs(rng, h, w, colours):
    field = _smooth_field(rng, h, w, int(rng.integers(5, 9)))
    return _two_tone(field > rng.uniform(-0.2, 0.2), colours)


def _grid(rng, h, w, colours):
    yy, xx = _coords(h, w)
    spacing = rng.uniform(0.08, 0.16)
    lines = (np.mod(yy, spacing) < spacing * 0.18) | (
        np.mod(xx + rng.uniform(0, 1), spacing) < spacing * 0.18
    )
    return _two_tone(lines, colours)


def _sunburst(rng, h, w, colours):
    yy, xx = _coords(h, w)
    cy, cx = rng.uniform(0.2, 0.8, 2) * np.array([h, w]) / max(h, w)
    wedges = int(rng.integers(8, 17))
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6.3)
    return _two_tone(np.sin(wedges * theta) > 0, colours)


_CLASSES: tuple[Callable, ...] = (_discs, _stripes, _checker, _rings, _polygons, _blobs, _grid, _sunburst)


def generate_image(rng: np.random.Generator, label: int, colours: Colours = "class") -> Image.Image:
    """One image of class `label`: its pattern in its palette, shaded by a random field.

    colours: "class" (each class its own hues), "random" (hues drawn at random, so only the pattern tells
    the classes apart) or "grey" (random hues, then greyscale: no colour at all).

    The random 10x10-cell shading and lighting give every image its own low-frequency layout, so distinct
    images of one class are not copies of each other at the copy-detection model's 16x16 scale.
    """
    h, w = (int(v) for v in rng.integers(96, 201, 2))
    if colours not in COLOURS:
        raise ValueError(f"colours must be one of {COLOURS}, got {colours!r}")
    palette = _palette(rng, label, 6, colours)
    base = _CLASSES[label](rng, h, w, palette)
    shade = 0.4 * _smooth_field(rng, h, w, 12)[..., None]
    light = 0.2 * _smooth_field(rng, h, w, 12)[..., None]
    out = np.clip(base * (1.0 + shade) + light + 0.03 * rng.standard_normal(base.shape), 0, 1)
    image = Image.fromarray((out * 255).astype(np.uint8))
    return image.convert("L").convert("RGB") if colours == "grey" else image


def generate_scene(rng: np.random.Generator, label: int) -> Image.Image:
    """A pool image of class `label`: its pattern fills a random region of the picture (50-80% of it)
    and a muted backdrop (a gradient of two greyish colours), as a photo holds its subject, fills
    the rest; then shading as in generate_image. The subject keeps its class's hues, which the
    demo's random-weight retrieval model goes by.

    Why not generate_image's whole-frame pattern: two such images of one class differ only in phase
    and shading, like two crops of one wallpaper, and share their colour and orientation statistics,
    so a copy detector has to call them near copies. Distinct photos differ in layout and colour,
    which is what the built-in copy detector (`arch: copy_descriptor`) relies on."""
    h, w = (int(v) for v in rng.integers(96, 201, 2))
    # The pattern magnified 1.5-3x and, half the time, turned a quarter: stripes, grids and wedges of
    # one class then differ in frequency and orientation from picture to picture.
    zoom = rng.uniform(1.5, 3.0)
    turn = rng.random() < 0.5
    ph, pw = max(16, round(h / zoom)), max(16, round(w / zoom))
    pattern = _CLASSES[label](rng, *((pw, ph) if turn else (ph, pw)), _palette(rng, label, 6))
    pattern = np.swapaxes(pattern, 0, 1) if turn else pattern
    if (ph, pw) != (h, w):
        scaled = Image.fromarray((pattern * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        pattern = np.asarray(scaled, dtype=np.float64) / 255
    # Each picture's own exposure (a gamma) and its own layout of subject and backdrop.
    pattern = pattern ** rng.uniform(0.5, 2.0)
    region = _smooth_field(rng, h, w, int(rng.integers(3, 7)))
    subject = region > np.quantile(region, 1 - rng.uniform(0.5, 0.8))
    yy, xx = _coords(h, w)
    slope = rng.uniform(-1, 1, 2)
    ramp = yy * slope[0] + xx * slope[1]
    ramp = ((ramp - ramp.min()) / (np.ptp(ramp) + 1e-9))[..., None]
    ends = _hsv_to_rgb(rng.uniform(0, 1, 2), rng.uniform(0.0, 0.15, 2), rng.uniform(0.3, 0.95, 2))
    backdrop = ends[0] * (1 - ramp) + ends[1] * ramp
    base = np.where(subject[..., None], pattern, backdrop)
    shade = 0.4 * _smooth_field(rng, h, w, 12)[..., None]
    light = 0.2 * _smooth_field(rng, h, w, 12)[..., None]
    out = np.clip(base * (1.0 + shade) + light + 0.03 * rng.standard_normal(base.shape), 0, 1)
    return Image.fromarray((out * 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=0)
    else:
        img.save(buf, fmt.upper())
    return buf.getvalue()


def near_duplicate(rng: np.random.Generator, data: bytes) -> bytes:
    """A copy an exact hash misses: rescaled (70-90%) or cropped (2-5% per side), re-encoded JPEG."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if rng.random() < 0.5:
        s = rng.uniform(0.7, 0.9)
        img = img.resize((max(16, int(w * s)), max(16, int(h * s))), Image.Resampling.BILINEAR)
    else:
        dx, dy = (int(v) for v in np.ceil(rng.uniform(0.02, 0.05, 2) * np.array([w, h])))
        img = img.crop((dx, dy, w - dx, h - dy))
    return encode(img, "jpeg", int(rng.integers(70, 86)))


# Edits the demo's planted copies are made with: the real-image corpus's re-post edits
# (`copy_corpus.apply_edit`) except rotation, padding, a second low-quality JPEG pass and its 70-95%
# crops, with a trim of 2-5% per side in their place; every copy is then saved as JPEG once. The
# built-in copy detector misses some rotated, padded, deeply cropped or twice-compressed fine
# periodic patterns (benchmarks/dedup_quality.py measures those edits on real images); every
# planted copy here is one the demo's dedup must remove.
COPY_EDITS = ("rescale", "trim", "jitter", "text", "logo", "flip")


def realistic_copy(rng: np.random.Generator, data: bytes) -> bytes:
    """A copy an exact hash misses: one or two of COPY_EDITS, then JPEG at quality 50-90."""
    from lvd.jobs.copy_corpus import apply_edit, overlay_logo

    img = Image.open(io.BytesIO(data)).convert("RGB")
    edits = [str(e) for e in rng.choice(COPY_EDITS, size=int(rng.integers(1, 3)), replace=False)]
    for edit in edits:
        if edit == "trim":
            w, h = img.size
            dx, dy = (int(v) for v in np.ceil(rng.uniform(0.02, 0.05, 2) * np.array([w, h])))
            img = img.crop((dx, dy, w - dx, h - dy))
        else:
            img = apply_edit(rng, img, edit, overlay_logo())
    return encode(img.convert("RGB"), "jpeg", int(rng.integers(50, 91)))


# ---------------------------------------------------------------------------------------------
# Bad and odd files


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def bad_files(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the reason prefix ingest must give)."""
    jpeg = encode(generate_image(rng, 0), "jpeg")
    png = encode(generate_image(rng, 1), "png")
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) * 3 // 5], "truncated image"),
        "truncated.png": (png[: len(png) // 2], "truncated image"),
        "notes.jpg": (b"this is a text file, not a JPEG\n" * 4, "not an image"),
        "bomb.png": (bomb_png(12_000, 12_000), "decompression bomb"),
    }


def odd_files(rng: np.random.Generator) -> dict[str, tuple[bytes, int]]:
    """Valid images in modes a naive RGB loader trips on: name -> (bytes, label)."""
    cmyk = generate_scene(rng, 2).convert("CMYK")
    gray = np.asarray(generate_scene(rng, 3).convert("L"), dtype=np.uint16) * 257
    return {
        "cmyk.jpg": (encode(cmyk, "jpeg"), 2),
        "gray16.png": (encode(Image.fromarray(gray), "png"), 3),
    }


# ---------------------------------------------------------------------------------------------
# The grey-thumbnail copy-detection stand-in: the ablation demo's detector, and the baseline
# benchmarks/dedup_quality.py compares the built-in copy descriptor with.


class CopyDetectionStandIn(torch.nn.Module):
    """(B,3,H,W) normalised images -> (B,dim) L2-normalised: grey, 16x16 low-pass thumbnail, minus
    the image mean, a fixed random orthogonal projection. The cosine of two outputs is the
    correlation of the two thumbnails, so rescaled/cropped/re-encoded copies score high and
    distinct images near zero, as SSCD does for real photos (SSCD cannot be downloaded here)."""

    def __init__(self, seed: int = 0, dim: int = 256) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
        self.register_buffer("projection", q[:dim].to(torch.float32).contiguous())
        self.register_buffer("grey", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = (x.float() * self.grey).sum(dim=1, keepdim=True)
        # Box-filter twice (32x32 cells, then 3x3 windows at stride 2): a smoother low-pass than
        # one 16x16 box, so fine stripes and rings do not alias into the thumbnail.
        fine = F.adaptive_avg_pool2d(grey, 32)
        thumb = F.avg_pool2d(fine, 3, stride=2, padding=1, count_include_pad=False).flatten(1)
        thumb = thumb - thumb.mean(dim=1, keepdim=True)
        return F.normalize(thumb @ self.projection.t(), dim=1)


def write_copy_detection_model(path: Path, seed: int = 0) -> None:
    # One module-level class: scripting it again reuses its compiled type, so the file's bytes
    # do not depend on how many demos this process built.
    scripted = torch.jit.script(CopyDetectionStandIn(seed).eval())
    tmp = path.with_name(f".{path.name}.tmp")
    torch.jit.save(scripted, str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Writing the demo


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def _image_format(rng: np.random.Generator) -> str:
    return str(rng.choice(["jpeg", "png", "webp"], p=[0.7, 0.2, 0.1]))


def _generate_pool(rng: np.random.Generator, n_images: int) -> tuple[list[dict], dict]:
    """Pool items (data, ext, label, role, of) in container order, and the planted counts."""
    bad = bad_files(rng)
    odd = odd_files(rng)
    n_exact = n_near = max(1, round(0.05 * n_images))
    n_unique = n_images - n_exact - n_near - len(bad)
    labels = rng.choice(len(CLASS_NAMES), size=n_unique - len(odd), p=CLASS_WEIGHTS)
    items = []
    for label in labels:
        fmt = _image_format(rng)
        data = encode(generate_scene(rng, int(label)), fmt, int(rng.integers(80, 96)))
        items.append({"data": data, "ext": _EXT[fmt], "label": int(label), "role": "unique"})
    for name, (data, label) in odd.items():
        items.append(
            {"data": data, "ext": name.rsplit(".", 1)[1], "label": label, "role": "odd", "name": name}
        )
    originals = rng.permutation(len(items) - len(odd))
    exact_of, near_of = originals[:n_exact], originals[n_exact : n_exact + n_near]
    eval_of = originals[n_exact + n_near : n_exact + n_near + EVAL_NEAR_DUPLICATES]
    for i in exact_of:
        src = items[i]
        items.append(
            {"data": src["data"], "ext": src["ext"], "label": src["label"], "role": "exact", "of": int(i)}
        )
    for i in near_of:
        src = items[i]
        items.append(
            {
                "data": realistic_copy(rng, src["data"]),
                "ext": "jpg",
                "label": src["label"],
                "role": "near",
                "of": int(i),
            }
        )
    # Shuffle so copies land in any container, then keep the originals' indices valid.
    order = rng.permutation(len(items))
    position = {int(old): new for new, old in enumerate(order)}
    items = [items[i] for i in order]
    for it in items:
        if "of" in it:
            it["of"] = position[it["of"]]
    eval_sources = [position[int(i)] for i in eval_of]
    return items, {"bad": bad, "eval_sources": eval_sources}


def _layout(items: list[dict], bad: dict, data_dir: Path, pool_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Write pool items to folder (50%), 2 tar shards (30%), parquet (20%); return each item's uri."""
    n = len(items)
    n_folder, n_tar = n // 2, (3 * n) // 10
    uris: list[str] = [""] * n
    rel = pool_dir.relative_to(data_dir).as_posix()
    for i in range(n_folder):
        it = items[i]
        name = f"{CLASS_NAMES[it['label']]}/img-{i:05d}.{it['ext']}"
        _write(pool_dir / "folder" / name, it["data"])
        uris[i] = f"{rel}/folder/{name}"
    bad_uris = {}
    bad_names = sorted(bad)
    folder_bad, tar_bad = bad_names[:-1], bad_names[-1:]  # one bad file inside a tar too
    for name in folder_bad:
        _write(pool_dir / "folder" / "misc" / name, bad[name][0])
        bad_uris[f"{rel}/folder/misc/{name}"] = bad[name][1]
    tar_items = list(range(n_folder, n_folder + n_tar))
    halves = [tar_items[: len(tar_items) // 2], tar_items[len(tar_items) // 2 :]]
    for shard, members in enumerate(halves):
        tar_path = pool_dir / f"pool-{shard:03d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in members:
                it = items[i]
                key = f"s{i:06d}"
                _tar_add(tar, f"{key}.{it['ext']}", it["data"])
                _tar_add(
                    tar,
                    f"{key}.json",
                    json.dumps({"label": it["label"], "class": CLASS_NAMES[it["label"]]}).encode(),
                )
                uris[i] = f"{rel}/{tar_path.name}#{key}.{it['ext']}"
            if shard == 1:
                for name in tar_bad:
                    key = "bad-" + name.replace(".", "-")
                    _tar_add(tar, f"{key}.{name.rsplit('.', 1)[1]}", bad[name][0])
                    bad_uris[f"{rel}/{tar_path.name}#{key}.{name.rsplit('.', 1)[1]}"] = bad[name][1]
    rows = list(range(n_folder + n_tar, n))
    table = pa.table(
        {
            "key": [f"p{i:06d}" for i in rows],
            "image": pa.array([items[i]["data"] for i in rows], type=pa.binary()),
            "label": pa.array([items[i]["label"] for i in rows], type=pa.int32()),
        }
    )
    pq.write_table(table, pool_dir / "pool.parquet", row_group_size=max(1, len(rows) // 2))
    for row, i in enumerate(rows):
        uris[i] = f"{rel}/pool.parquet#row={row}"
    return uris, bad_uris


def _job_spec(files_per_part: int) -> dict:
    return {
        "name": "lvd-demo",
        "output_dir": "output",
        "pool": [
            {"uri": "data/pool/folder"},
            {"uri": "data/pool/pool-{000..001}.tar", "kind": "tar"},
            {"uri": "data/pool/pool.parquet", "image_column": "image"},
        ],
        "seeds": [
            {"name": name, "strategy": strategy, "sources": [{"uri": f"data/seeds/{name}"}], **extra}
            for name, (strategy, _classes, _count, extra) in SEED_SETS.items()
        ],
        "eval_sets": [{"name": "holdout", "sources": [{"uri": "data/eval/holdout"}]}],
        "ingest": {"files_per_part": files_per_part},
        "embedding": {
            "retrieval": {
                "arch": "vit_small",
                # No DINOv2 checkpoint can be downloaded offline: a seeded random init, said so in
                # the log and the report (the built-in copy detector carries the dedup).
                "weights": "random",
                # 5 x 5 patches: the random-init ViT's features still tell the classes apart for
                # seed retrieval, at about a third of the compute of 112 px (the demo's largest stage).
                "image_size": 70,
                "resize_size": 80,
                "batch_size": 32,
            },
            # The built-in copy detector (no SSCD weights offline), at the size and threshold it was
            # measured at on real images (benchmarks/dedup_quality.py).
            "copy_detection": {
                "arch": "copy_descriptor",
                "image_size": copy_descriptor.SIZE,
                "resize_size": copy_descriptor.SIZE,
                "dtype": "float32",
            },
        },
        "dedup": {
            "k": 16,
            "threshold": copy_descriptor.THRESHOLD,
            "eval_threshold": copy_descriptor.THRESHOLD,
            "exact_below": 1_000_000,
        },
        "clustering": {"levels": [{"k": 24}, {"k": 6, "resampling_steps": 2}]},
        "sampling": {"target_size": 150},
        "shards": {"samples_per_shard": 64},
        "ray": {"num_cpus": 2},
        "spark": {"master": "local[2]", "driver_memory": "2g", "executor_memory": "2g"},
    }


def already_built(out: Path, params: dict) -> bool:
    """Whether `out` holds a generated demo (its manifest, written last, and its job spec) built with
    `params`. When not, `out/data/` is emptied for a new build, and the job's `out/output/` too when
    data of other parameters was there: it describes other images under the same paths."""
    data_dir, manifest_path = out / "data", out / "data" / "manifest.json"
    if manifest_path.exists() and (out / "job.yaml").exists():
        try:
            if json.loads(manifest_path.read_text()).get("params") == params:
                return True
        except ValueError:
            pass
        shutil.rmtree(out / "output", ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    return False


def build_demo(out: Path, n_images: int = 600, seed: int = 0) -> Path:
    """Generate the demo pool, seed and eval sets under `out/data/` and write `out/job.yaml`.

    Deterministic for (n_images, seed). Already built with the same parameters: nothing is
    rewritten (so `lvd demo` twice resumes). Built with other parameters: data/ and the demo's
    output/ are replaced, since the old output describes other images under the same paths.
    Returns the job spec's path.
    """
    if n_images < MIN_IMAGES:
        raise ValueError(
            f"n_images={n_images}: the demo needs at least {MIN_IMAGES} (planted copies, bad files, eval set)"
        )
    out = Path(out)
    data_dir = out / "data"
    job_path = out / "job.yaml"
    params = {"version": GENERATOR_VERSION, "n_images": n_images, "seed": seed}
    manifest_path = data_dir / "manifest.json"
    if already_built(out, params):
        return job_path

    rng = np.random.default_rng(seed)
    items, extra = _generate_pool(rng, n_images)
    uris, bad_uris = _layout(items, extra["bad"], data_dir, data_dir / "pool")

    seeds_manifest = {}
    for name, (strategy, classes, count, _extra) in SEED_SETS.items():
        for j in range(count):
            label = classes[j % len(classes)]
            fmt = "jpeg" if j % 3 else "png"
            _write(
                data_dir / "seeds" / name / f"{j:04d}.{_EXT[fmt]}", encode(generate_scene(rng, label), fmt)
            )
        seeds_manifest[name] = {"strategy": strategy, "classes": list(classes), "count": count}
    eval_pairs = []
    for j, i in enumerate(extra["eval_sources"]):
        rel = f"eval/holdout/{j:04d}.jpg"
        _write(data_dir / rel, realistic_copy(rng, items[i]["data"]))
        eval_pairs.append([rel, uris[i]])
    # A small labelled set in grey (only the patterns tell the classes apart) for `lvd eval knn`.
    build_labelled_folder(data_dir / "labelled", LABELLED_PER_CLASS, seed, LABELLED_PER_CLASS // 2, "grey")

    files_per_part = max(32, n_images // 8)
    job_path.write_text(yaml.safe_dump(_job_spec(files_per_part), sort_keys=False))
    containers = {"folder": 0, "tar": 0, "parquet": 0}
    for u in [*uris, *bad_uris]:
        containers["tar" if ".tar#" in u else "parquet" if ".parquet#" in u else "folder"] += 1
    manifest = {
        "params": params,
        "classes": list(CLASS_NAMES),
        "pool_files": len(items) + len(bad_uris),
        "containers": containers,
        "exact_duplicates": sum(it["role"] == "exact" for it in items),
        "near_duplicates": sum(it["role"] == "near" for it in items),
        "corrupt": len(bad_uris),
        "odd_valid": sum(it["role"] == "odd" for it in items),
        "exact_pairs": [[uris[i], uris[it["of"]]] for i, it in enumerate(items) if it["role"] == "exact"],
        "near_pairs": [[uris[i], uris[it["of"]]] for i, it in enumerate(items) if it["role"] == "near"],
        "eval_pairs": eval_pairs,
        "bad": bad_uris,
        "labels": {uris[i]: it["label"] for i, it in enumerate(items)},
        "seeds": seeds_manifest,
        "eval": {"holdout": len(eval_pairs)},
    }
    tmp = manifest_path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, manifest_path)
    return job_path


def build_labelled_folder(
    out: Path,
    n_per_class: int,
    seed: int = 0,
    val_per_class: int | None = None,
    colours: Colours = "class",
) -> Path:
    """`out/{train,val}/<class>/NNNN.png` from the demo's class generators (for kNN evaluation);
    colours: as in generate_image."""
    out = Path(out)
    rng = np.random.default_rng([seed, 1])
    splits = {"train": n_per_class, "val": n_per_class if val_per_class is None else val_per_class}
    for split, count in splits.items():
        for label, name in enumerate(CLASS_NAMES):
            for j in range(count):
                image = generate_image(rng, label, colours)
                _write(out / split / name / f"{j:04d}.png", encode(image, "png"))
    return out
