"""Dedup threshold calibration: how many neighbour pairs fall in each cosine bin, with example pairs.

`calibrate(output_dir, out)` reads a job's `embeddings` (the copy-detection model's vectors, else
the retrieval model's) for the pool, finds each image's nearest neighbours, counts the pairs per
similarity bin and writes a few pairs per bin as side-by-side thumbnails, so a user sees what 0.55,
0.60 or 0.65 mean for their copy detector and pool before choosing `dedup.threshold`.

A tool run on one machine: it reads the vectors of at most `max_images` pool images (a keyed
sample of the pool when it is larger), so its memory is bounded whatever the pool's size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from lvd.curation.image_io import read_image_bytes
from lvd.curation.knn import build_index, search
from lvd.curation.seeded import keyed_uniform
from lvd.curation.stage_io import load_images, load_vectors
from lvd.embeddings.preprocess import decode_image, to_rgb
from lvd.schemas import layout
from lvd.schemas.layout import COPY_DETECTION, POOL, RETRIEVAL

THUMB = 160  # side of each thumbnail in an example PNG
SAMPLE_STREAM = 7  # keyed-randomness stream of the calibration sample


@dataclass
class Bin:
    low: float
    high: float
    pairs: int
    examples: list[Path]


def neighbour_pairs(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) of every pair where one is among the other's k nearest, each pair once (i < j)."""
    n = vectors.shape[0]
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    index, _ = build_index(vectors, factory="Flat", exact_below=n + 1)
    sims, nbrs = search(index, vectors, min(k + 1, n), 65_536)
    rows = np.repeat(np.arange(n), sims.shape[1])
    cols, s = nbrs.ravel(), sims.ravel()
    ok = (cols >= 0) & (cols != rows)
    i, j = np.minimum(rows[ok], cols[ok]), np.maximum(rows[ok], cols[ok])
    key, first = np.unique(i * n + j, return_index=True)
    return key // n, key % n, s[ok][first]


def bin_edges(low: float, high: float, step: float) -> np.ndarray:
    return np.round(np.arange(low, high + step / 2, step), 6)


def side_by_side(a: bytes, b: bytes, label: str) -> Image.Image:
    """Two images as thumbnails next to each other, with `label` above them."""
    canvas = Image.new("RGB", (2 * THUMB + 12, THUMB + 24), (255, 255, 255))
    for k, data in enumerate((a, b)):
        img = to_rgb(decode_image(data))
        img.thumbnail((THUMB, THUMB))
        canvas.paste(img, (4 + k * (THUMB + 4) + (THUMB - img.width) // 2, 20 + (THUMB - img.height) // 2))
    ImageDraw.Draw(canvas).text((4, 4), label, fill=(0, 0, 0))
    return canvas


def calibrate(
    output_dir: str | Path,
    out: str | Path,
    *,
    low: float = 0.4,
    high: float = 1.0,
    step: float = 0.05,
    examples: int = 4,
    k: int = 16,
    max_images: int = 20_000,
    seed: int = 0,
) -> tuple[str, list[Bin]]:
    """Count neighbour pairs per cosine bin [low, high) in `step`s and write `examples` pairs per
    bin (the first in a keyed order) under `out/`. Returns (the model whose vectors were used, bins)."""
    image_parts = layout.list_parts(layout.table_dir(output_dir, layout.IMAGES))
    embed_dir = layout.table_dir(output_dir, layout.EMBEDDINGS)
    model = COPY_DETECTION if layout.list_parts(embed_dir, COPY_DETECTION) else RETRIEVAL
    pool = load_images(image_parts, POOL, ["image_id", "kind", "path", "member", "offset", "size", "uri"])
    ids = pool["image_id"].to_numpy()
    if ids.size > max_images:
        ids = np.sort(ids[np.argsort(keyed_uniform(ids, seed, SAMPLE_STREAM))[:max_images]])
    ids, vectors = load_vectors(layout.list_parts(embed_dir, model), model, ids)
    i, j, sims = neighbour_pairs(vectors, k)
    edges = bin_edges(low, high, step)
    which = np.searchsorted(edges, sims, side="right") - 1
    rows = pool.filter(pc.is_in(pool["image_id"], value_set=pa.array(ids)))
    rows = rows.take(np.searchsorted(rows["image_id"].to_numpy(), ids))
    out = Path(out)
    bins = []
    for b in range(edges.size - 1):
        in_bin = np.flatnonzero(which == b)
        lo, hi = float(edges[b]), float(edges[b + 1])
        folder = out / f"{lo:.2f}-{hi:.2f}"
        written = []
        order = np.argsort(keyed_uniform(ids[i[in_bin]] * 1_000_003 + ids[j[in_bin]], seed, SAMPLE_STREAM))
        for n, p in enumerate(in_bin[order][:examples]):
            pair = [_read(rows, int(i[p])), _read(rows, int(j[p]))]
            image = side_by_side(*pair, f"cosine {sims[p]:.3f}")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"pair-{n}.png"
            buf = io.BytesIO()
            image.save(buf, "PNG")
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(path)
            written.append(path)
        bins.append(Bin(lo, hi, int(in_bin.size), written))
    return model, bins


def _read(rows: pa.Table, r: int) -> bytes:
    kind, path, member, offset, size = (
        rows[c][r].as_py() for c in ("kind", "path", "member", "offset", "size")
    )
    return read_image_bytes(kind, path, member, offset, size)
