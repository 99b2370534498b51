"""Pixel verification of candidate copy pairs: do two images share literal pixels at fine scale?

A global copy descriptor scores a deep crop, a rotated crop or a low-contrast picture below the
dedup threshold, and two far-apart crops of one texture near it. A real copy (crop, rescale,
rotation of a few degrees, JPEG, colour change, overlay, padding, mirror) still contains its
original's pixels at some scale, angle and offset; a different picture does not. The verifier:
  1. `prepare_image`: decode (transparency on white), grey, trim uniform borders (padding), resize
     the content to SIDE pixels of geometric mean side (aspect kept), then band-pass it (fine
     structure: edges and texture grain, not shading or colour) at full and at half resolution;
  2. `overlap_score`: over a few scales, angles and both mirrorings of one image, phase correlation
     at half resolution finds the best offset; at full resolution the alignment is refined and
     scored by the normalised cross-correlation of the band-passed images in their overlap. A
     repeating pattern aligns at several offsets: the score is the best correlation less the best
     at the other strong offsets, so only a unique alignment counts. A strongly periodic texture
     (a brick wall) can still pass, which is why verification only adds near misses below the
     threshold and vetoes nothing above it.
Plain numpy and PIL; the dedup stage runs `verify_pairs` on Ray workers over candidate pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lvd.embeddings.preprocess import decode_image, to_rgb

SIDE = 128  # geometric mean side of the content the verifier compares
# Relative scales and angles (degrees) tried at half resolution, then refined at full resolution.
SCALES = tuple(float(s) for s in np.exp(np.linspace(np.log(0.7), np.log(1 / 0.7), 13)))
ANGLES = (-6.0, -3.0, 0.0, 3.0, 6.0)
FINE_SCALES = (0.97, 0.985, 1.0, 1.015, 1.03)
FINE_ANGLES = (-1.5, 0.0, 1.5)
PEAKS = 3  # strong offsets compared per alignment (the best and the runners-up)
ENERGY_FLOOR = 0.0  # share of the mean local energy added under the root (0: pure local normalisation)
MIN_OVERLAP = 0.3  # of the smaller image's area: less overlap scores nothing
TRIM_TOLERANCE = 0.08  # a border row/column holds nothing but pixels this close to the border colour
FLAT_BORDER = 0.02  # and a trimmed band's mean distance to it stays under this (padding is flat)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    t = np.arange(-r, r + 1)
    k = np.exp(-t * t / (2 * sigma * sigma))
    k /= k.sum()
    p = np.pad(x, ((0, 0), (r, r)), mode="reflect")
    h = sum(k[i] * p[:, i : i + x.shape[1]] for i in range(2 * r + 1))
    p = np.pad(h, ((r, r), (0, 0)), mode="reflect")
    return sum(k[i] * p[i : i + x.shape[0]] for i in range(2 * r + 1))


def band_pass(grey: np.ndarray, fine: float = 0.8, coarse: float = 3.0) -> np.ndarray:
    """Difference of Gaussians, divided by its local energy (with a floor, so flat noisy areas such
    as sky or JPEG blocks do not weigh as much as edges), clipped."""
    x = _blur(grey, fine) - _blur(grey, coarse)
    energy = _blur(x * x, 2 * coarse)
    x = x / np.sqrt(energy + ENERGY_FLOOR * float(energy.mean()) + 1e-4)
    return np.clip(x, -3, 3).astype(np.float32)


def content_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) after trimming uniform borders: edge rows/columns whose pixels all lie close
    to the border colour, when the trimmed band is flat on average (padding, not a sky)."""
    h, w = grey.shape
    border = np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]))
    dev = np.abs(grey - border)
    rows = (dev > TRIM_TOLERANCE).mean(1) > 0.01
    cols = (dev > TRIM_TOLERANCE).mean(0) > 0.01
    if not rows.any() or not cols.any():
        return 0, h, 0, w
    (y0, y1), (x0, x1) = np.flatnonzero(rows)[[0, -1]], np.flatnonzero(cols)[[0, -1]]
    row_dev, col_dev = dev.mean(1), dev.mean(0)
    if y0 and row_dev[:y0].mean() > FLAT_BORDER:
        y0 = 0
    if y1 < h - 1 and row_dev[y1 + 1 :].mean() > FLAT_BORDER:
        y1 = h - 1
    if x0 and col_dev[:x0].mean() > FLAT_BORDER:
        x0 = 0
    if x1 < w - 1 and col_dev[x1 + 1 :].mean() > FLAT_BORDER:
        x1 = w - 1
    if y1 - y0 < 0.2 * h or x1 - x0 < 0.2 * w:
        return 0, h, 0, w
    return int(y0), int(y1) + 1, int(x0), int(x1) + 1


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    method = Image.Resampling.BOX if w < a.shape[1] else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(a), "F").resize((w, h), method), np.float32)


@dataclass
class VerificationImage:
    fine: np.ndarray  # band-passed content, about SIDE x SIDE
    coarse: np.ndarray  # the same at half resolution


def prepare_image(data: bytes) -> VerificationImage:
    """The verifier's view of encoded image bytes (`ImageDecodeError` for bytes that are no image)."""
    img = to_rgb(decode_image(data)).convert("L")
    w, h = img.size
    shrink = 4 * SIDE / max(w, h)
    if shrink < 1:
        img = img.resize((max(1, round(w * shrink)), max(1, round(h * shrink))), Image.Resampling.BOX)
    grey = np.asarray(img, np.float32) / 255
    y0, y1, x0, x1 = content_box(grey)
    content = grey[y0:y1, x0:x1]
    s = SIDE / np.sqrt(content.size)
    nw = max(16, min(2 * SIDE, round(content.shape[1] * s)))
    nh = max(16, min(2 * SIDE, round(content.shape[0] * s)))
    full = _resize(content, nw, nh)
    return VerificationImage(band_pass(full), band_pass(_resize(full, nw // 2, nh // 2), 0.6, 2.0))


def _warp(img: np.ndarray, scale: float, angle: float, mirror: bool) -> np.ndarray:
    """Mirrored, scaled and turned by `angle` degrees about its centre; NaN where nothing lands."""
    im = Image.fromarray(np.ascontiguousarray(img[:, ::-1] if mirror else img), "F")
    w, h = im.size
    im = im.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BILINEAR)
    if angle:
        im = im.rotate(angle, Image.Resampling.BILINEAR, expand=False, fillcolor=float("nan"))
    return np.asarray(im, np.float32)


def _ncc_at(a: np.ndarray, b: np.ndarray, dy: int, dx: int, min_overlap: float) -> float:
    """Normalised cross-correlation of `a` and `b` placed with its corner at (dy, dx) in `a`, over
    their overlap (-1 when it is smaller than `min_overlap` pixels)."""
    ha, wa = a.shape
    hb, wb = b.shape
    y0, x0, y1, x1 = max(0, dy), max(0, dx), min(ha, dy + hb), min(wa, dx + wb)
    if y1 <= y0 or x1 <= x0 or (y1 - y0) * (x1 - x0) < min_overlap:
        return -1.0
    pa, pb = a[y0:y1, x0:x1], b[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
    ok = np.isfinite(pb)
    if ok.sum() < min_overlap:
        return -1.0
    pa, pb = pa[ok], pb[ok]
    pa, pb = pa - pa.mean(), pb - pb.mean()
    return float((pa * pb).sum() / (np.sqrt((pa * pa).sum() * (pb * pb).sum()) + 1e-6))


def _peaks(surface: np.ndarray, n: int, radius: int) -> list[tuple[float, int, int]]:
    """The n highest values of a (circular) correlation surface, at least `radius` apart."""
    r = surface.copy()
    h, w = r.shape
    out = []
    for _ in range(n):
        dy, dx = divmod(int(np.argmax(r)), w)
        out.append((float(r[dy, dx]), dy if dy <= h // 2 else dy - h, dx if dx <= w // 2 else dx - w))
        r[
            np.ix_(np.arange(dy - radius, dy + radius + 1) % h, np.arange(dx - radius, dx + radius + 1) % w)
        ] = -np.inf
    return out


def _fft_size(n: int) -> int:
    """The smallest 2^a * 3^b at least n (a fast FFT length)."""
    best = 1 << (n - 1).bit_length()
    p3 = 1
    while p3 < best:
        p2 = p3
        while p2 < n:
            p2 *= 2
        best = min(best, p2)
        p3 *= 3
    return best


def overlap_score(a: VerificationImage, b: VerificationImage) -> float:
    """How surely `b` is a crop/rescale/turn/mirror of the same pixels as `a`: the fine-scale
    correlation at the best alignment less that at the runner-up offsets (about 0: unrelated or a
    repeating pattern; near 1: the same pixels)."""
    ca = a.coarse
    h = _fft_size(ca.shape[0] + int(np.ceil(b.coarse.shape[0] * SCALES[-1])) + 2)
    w = _fft_size(ca.shape[1] + int(np.ceil(b.coarse.shape[1] * SCALES[-1])) + 2)
    fa = np.fft.rfft2(ca, (h, w))
    best_peak, best = -np.inf, None
    for mirror in (False, True):
        for scale in SCALES:
            for angle in ANGLES:
                fb = np.fft.rfft2(np.nan_to_num(_warp(b.coarse, scale, angle, mirror)), (h, w))
                cross = fa * np.conj(fb)
                surface = np.fft.irfft2(cross / (np.abs(cross) + 1e-6), (h, w))
                top = float(surface.max())
                if top > best_peak:
                    best_peak, best = top, (mirror, scale, angle, surface)
    mirror, scale, angle, surface = best
    peaks = _peaks(surface, PEAKS, 4)
    min_overlap = MIN_OVERLAP * min(a.fine.size, b.fine.size)

    def at(img: np.ndarray, dy: int, dx: int) -> float:
        return max(
            _ncc_at(a.fine, img, 2 * dy + u, 2 * dx + v, min_overlap) for u in (-1, 0, 1) for v in (-1, 0, 1)
        )

    top, warped = -1.0, None
    for fs in FINE_SCALES:
        for fa_ in FINE_ANGLES:
            img = _warp(b.fine, scale * fs, angle + fa_, mirror)
            v = at(img, peaks[0][1], peaks[0][2])
            if v > top:
                top, warped = v, img
    if top <= -1.0:
        return -1.0
    runner_up = max([at(warped, dy, dx) for _, dy, dx in peaks[1:]] + [0.0])
    return top - runner_up


def verify_pairs(pairs: Sequence[tuple[int, int]], read: Callable[[int], bytes]) -> tuple[np.ndarray, int]:
    """`overlap_score` of each pair of keys, reading each image once with `read(key)`. A pair with an
    image that cannot be read or decoded scores -1. Returns (scores, images that failed)."""
    prepared: dict[int, VerificationImage | None] = {}
    failed = 0
    for key in {k for pair in pairs for k in pair}:
        try:
            prepared[key] = prepare_image(read(key))
        except Exception:  # noqa: BLE001 - unreadable bytes or a vanished file: the pair stays unverified
            prepared[key] = None
            failed += 1
    scores = np.full(len(pairs), -1.0, dtype=np.float32)
    for n, (x, y) in enumerate(pairs):
        if prepared[x] is not None and prepared[y] is not None:
            scores[n] = overlap_score(prepared[x], prepared[y])
    return scores, failed
