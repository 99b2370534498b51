"""A real-image copy-detection corpus with ground truth, built from images that installed packages ship.

Sources (nothing is downloaded): the photos and drawings inside scikit-image's wheel (`skimage/data`),
scikit-learn's sample images and matplotlib's sample data. From them `build_copy_corpus` makes:

- originals: whole images, and far-apart crops of large images (each crop a distinct original; the
  whole image is then left out, so no original contains another);
- planted copies of originals, each by one or two realistic edits (rescale, a 70-95% crop, JPEG at
  quality 30-90, a small rotation, colour jitter, a text or logo overlay, uniform padding, a mirror
  flip), re-encoded (a crop keeps 70-95% of the picture's area);
- icons: flat-colour drawings with transparency, each rendered at several sizes (the renders of one
  drawing are copies of each other; different drawings are not).

Each image carries its copy group: images of one group are copies, images of different groups are
not. Deterministic for a given seed. Tests (`tests/test_dedup_quality.py`) and
`benchmarks/dedup_quality.py` share this module.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

# Whole images used as originals (package, file). The stereo twin of motorcycle_left is left out: the
# two are nearly the same picture, and neither "copy" nor "distinct" is a fair label for them.
WHOLE_IMAGES = (
    ("skimage", "astronaut.png"),
    ("skimage", "camera.png"),
    ("skimage", "cell.png"),
    ("skimage", "chelsea.png"),
    ("skimage", "clock_motion.png"),
    ("skimage", "coins.png"),
    ("skimage", "color.png"),
    ("skimage", "horse.png"),
    ("skimage", "retina.jpg"),
    ("skimage", "logo.png"),
    ("skimage", "moon.png"),
    ("skimage", "page.png"),
    ("skimage", "phantom.png"),
    ("skimage", "text.png"),
    ("skimage", "microaneurysms.png"),
    ("matplotlib", "grace_hopper.jpg"),
    ("matplotlib", "Minduka_Present_Blue_Pack.png"),
    ("matplotlib", "logo2.png"),
)
# Large images cut into far-apart crops: the four corner regions, each CROP_SIDE of the side.
CROPPED_IMAGES = (
    ("skimage", "ihc.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "coffee.png"),
    ("skimage", "rocket.jpg"),
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "gravel.png"),
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
)
CROP_SIDE = 0.45
TEXTURES = ("brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg")
EDITS = ("rescale", "crop", "jpeg", "rotate", "jitter", "text", "logo", "pad", "flip")


def _package_dir(package: str) -> Path:
    if package == "skimage":
        return Path(str(resources.files("skimage") / "data"))
    if package == "sklearn":
        return Path(str(resources.files("sklearn.datasets") / "images"))
    if package == "matplotlib":
        return Path(str(resources.files("matplotlib") / "mpl-data" / "sample_data"))
    raise ValueError(f"unknown package {package!r}")


def load_packaged_image(package: str, name: str) -> Image.Image:
    """A bundled image as RGB, or RGBA when it has transparency."""
    img = Image.open(_package_dir(package) / name)
    img.load()
    return img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB")


@functools.cache
def overlay_logo() -> Image.Image:
    """The mark the "logo" edit pastes onto a copy (RGBA)."""
    return load_packaged_image("matplotlib", "Minduka_Present_Blue_Pack.png").convert("RGBA")


@dataclass
class CorpusImage:
    name: str  # file name, unique in the corpus
    data: bytes  # encoded image
    group: int  # copy group
    kind: str  # "original", "copy", "icon"
    edits: list[str] = field(default_factory=list)


@dataclass
class CopyCorpus:
    images: list[CorpusImage]

    @property
    def groups(self) -> np.ndarray:
        return np.array([im.group for im in self.images], dtype=np.int64)

    def copy_pairs(self) -> np.ndarray:
        """Index pairs (i < j) of images in one copy group: the true copies."""
        g = self.groups
        i, j = np.triu_indices(g.size, 1)
        same = g[i] == g[j]
        return np.stack([i[same], j[same]], axis=1)

    def write(self, folder: str | Path) -> list[Path]:
        """Write every image into `folder` (plus `groups.json`: file name -> copy group)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for im in self.images:
            (folder / im.name).write_bytes(im.data)
            paths.append(folder / im.name)
        tmp = folder / ".groups.json.tmp"
        tmp.write_text(json.dumps({im.name: im.group for im in self.images}, indent=0))
        os.replace(tmp, folder / "groups.json")
        return paths


# ---------------------------------------------------------------- encoding and edits


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, "JPEG", quality=int(quality))
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _flatten(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    if img.mode != "RGBA":
        return img.convert("RGB")
    base = Image.new("RGBA", img.size, (*background, 255))
    return Image.alpha_composite(base, img).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, size))
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def apply_edit(rng: np.random.Generator, img: Image.Image, edit: str, logo: Image.Image) -> Image.Image:
    """One realistic edit of an image (RGB or RGBA)."""
    w, h = img.size
    if edit == "rescale":
        s = rng.uniform(0.4, 0.9)
        return img.resize((max(24, round(w * s)), max(24, round(h * s))), Image.Resampling.BICUBIC)
    if edit == "crop":
        area = rng.uniform(0.7, 0.95)  # the share of the picture kept
        aspect = np.exp(rng.uniform(-0.1, 0.1))
        cw = min(w, round(w * np.sqrt(area) * aspect))
        ch = min(h, round(h * np.sqrt(area) / aspect))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch))
    if edit == "jpeg":
        return Image.open(io.BytesIO(encode(img, "jpeg", int(rng.integers(30, 91))))).convert("RGB")
    if edit == "rotate":
        angle = rng.uniform(2, 8) * rng.choice([-1, 1])
        out = _flatten(img).rotate(angle, Image.Resampling.BICUBIC, expand=False)
        m = int(np.ceil(np.tan(np.radians(abs(angle))) * max(w, h) / 2))  # cut the filled corners away
        return out.crop((m, m, w - m, h - m)) if min(w, h) > 4 * m else out
    if edit == "jitter":
        out = _flatten(img)
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.75, 1.25))
        out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.75, 1.25))
        return ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    if edit == "text":
        out = _flatten(img)
        draw = ImageDraw.Draw(out)
        size = max(8, int(h * rng.uniform(0.06, 0.12)))
        words = ["sample", "copyright 2024", "lvd", "photo", "www.example.org", "sale!"]
        text = str(rng.choice(words))
        x, y = int(rng.uniform(0.02, 0.5) * w), int(rng.uniform(0.02, 0.85) * h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.text((x, y), text, fill=colour, font=_font(size))
        return out
    if edit == "logo":
        out = _flatten(img).convert("RGBA")
        side = max(8, int(min(w, h) * rng.uniform(0.12, 0.22)))
        mark = logo.resize((side, side), Image.Resampling.BICUBIC)
        corner = int(rng.integers(0, 4))
        x = 4 if corner in (0, 2) else w - side - 4
        y = 4 if corner in (0, 1) else h - side - 4
        out.alpha_composite(mark, (max(0, x), max(0, y)))
        return out.convert("RGB")
    if edit == "pad":
        out = _flatten(img)
        p = rng.uniform(0.05, 0.2, 4) * np.array([w, h, w, h])
        left, top, right, bottom = (int(v) for v in p)
        colour = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
        canvas = Image.new("RGB", (w + left + right, h + top + bottom), colour)
        canvas.paste(out, (left, top))
        return canvas
    if edit == "flip":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raise ValueError(f"unknown edit {edit!r}")


def make_copy(rng: np.random.Generator, img: Image.Image, logo: Image.Image) -> tuple[bytes, list[str]]:
    """A planted copy: one or two edits, then JPEG (quality 30-90) or PNG."""
    edits = list(rng.choice(EDITS, size=int(rng.integers(1, 3)), replace=False))
    edits.sort(key=lambda e: e == "pad")  # padding frames the edited picture, as a re-post does
    out = img
    for e in edits:
        out = apply_edit(rng, out, str(e), logo)
    if rng.random() < 0.75:
        return encode(out, "jpeg", int(rng.integers(30, 91))), edits
    return encode(out, "png"), edits


# ---------------------------------------------------------------- icons


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int, int]:
    return (*(int(c) for c in rng.integers(0, 256, 3)), 255)


def draw_icon_shapes(rng: np.random.Generator) -> list[tuple]:
    """A drawing: 2-4 flat-colour shapes in unit coordinates (rendered at any size by `render_icon`)."""
    shapes = []
    if rng.random() < 0.4:  # an app-icon style backdrop
        shapes.append(("rounded", (0.04, 0.04, 0.96, 0.96), _random_colour(rng)))
    for _ in range(int(rng.integers(2, 5))):
        kind = str(rng.choice(["ellipse", "rect", "polygon", "line"]))
        x0, y0 = rng.uniform(0.05, 0.6, 2)
        x1, y1 = x0 + rng.uniform(0.2, 0.45), y0 + rng.uniform(0.2, 0.45)
        if kind == "polygon":
            n = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
            box = tuple((cx + r * np.cos(a), cy + r * np.sin(a)) for a in ang)
        else:
            box = (x0, y0, min(x1, 0.95), min(y1, 0.95))
        shapes.append((kind, box, _random_colour(rng)))
    return shapes


def render_icon(shapes: list[tuple], size: int) -> Image.Image:
    """An RGBA drawing at `size` x `size`, transparent where nothing is drawn."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    for kind, box, colour in shapes:
        if kind == "polygon":
            draw.polygon([(x * size, y * size) for x, y in box], fill=colour)
            continue
        xy = tuple(v * size for v in box)
        if kind == "ellipse":
            draw.ellipse(xy, fill=colour)
        elif kind == "rect":
            draw.rectangle(xy, fill=colour)
        elif kind == "rounded":
            draw.rounded_rectangle(xy, radius=size * 0.15, fill=colour)
        else:
            draw.line(xy, fill=colour, width=max(1, round(size * 0.06)))
    return img


ICON_SIZES = (32, 48, 64, 96, 128, 192, 256)


# ---------------------------------------------------------------- the corpus


def originals() -> list[tuple[str, Image.Image]]:
    """(name, image) of every original photo or drawing: whole images and far-apart crops."""
    out = []
    for package, name in WHOLE_IMAGES:
        out.append((Path(name).stem, load_packaged_image(package, name)))
    for package, name in CROPPED_IMAGES:
        img = load_packaged_image(package, name)
        w, h = img.size
        cw, ch = round(w * CROP_SIDE), round(h * CROP_SIDE)
        corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]
        if name in TEXTURES:  # a texture (or star field) looks alike everywhere: two crops, diagonally apart
            corners = corners[::3]
        for k, (x, y) in enumerate(corners):
            out.append((f"{Path(name).stem}-crop{k}", img.crop((x, y, x + cw, y + ch))))
    return out


def build_copy_corpus(
    seed: int = 0, *, copy_rate: float = 0.7, max_copies: int = 3, icons: int = 20, icon_sizes: int = 3
) -> CopyCorpus:
    """The corpus: every original; for a `copy_rate` share of them 1..max_copies planted copies; and
    `icons` drawings at `icon_sizes` sizes each. Deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    logo = overlay_logo()
    images: list[CorpusImage] = []
    for group, (name, img) in enumerate(originals()):
        fmt = "png" if img.mode == "RGBA" or rng.random() < 0.3 else "jpeg"
        images.append(
            CorpusImage(f"{name}.{'png' if fmt == 'png' else 'jpg'}", encode(img, fmt, 92), group, "original")
        )
        if rng.random() < copy_rate:
            for c in range(int(rng.integers(1, max_copies + 1))):
                data, edits = make_copy(rng, img, logo)
                ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
                images.append(CorpusImage(f"{name}-copy{c}.{ext}", data, group, "copy", edits))
    group = images[-1].group + 1
    for k in range(icons):
        shapes = draw_icon_shapes(rng)
        for size in sorted(rng.choice(ICON_SIZES, size=icon_sizes, replace=False)):
            data = encode(render_icon(shapes, int(size)), "png")
            images.append(CorpusImage(f"icon{k:03d}-{size}.png", data, group, "icon"))
        group += 1
    order = rng.permutation(len(images))  # copies land anywhere in the pool
    return CopyCorpus([images[i] for i in order])


# ---------------------------------------------------------------- scoring a copy detector on it


@dataclass
class PairQuality:
    threshold: float
    precision: float  # of the pairs above the threshold, the share that are copies
    recall: float  # of the copy pairs, the share above the threshold
    copy_pairs: int
    predicted_pairs: int
    best_recall: float  # the highest recall at precision >= `target_precision`
    best_threshold: float  # the threshold that reaches it


def pair_quality(
    vectors: np.ndarray, groups: np.ndarray, threshold: float, target_precision: float = 0.95
) -> PairQuality:
    """Pair precision and recall of cosine > `threshold` against the copy groups (every pair of
    images counts once), and the best recall any threshold reaches at `target_precision`."""
    sims = vectors @ vectors.T
    i, j = np.triu_indices(groups.size, 1)
    same = groups[i] == groups[j]
    sim = sims[i, j]
    predicted = sim > threshold
    tp = int((predicted & same).sum())
    order = np.argsort(-sim, kind="stable")
    hits = np.cumsum(same[order])
    precision_at = hits / np.arange(1, hits.size + 1)
    reach = np.flatnonzero(precision_at >= target_precision)
    best_recall = float(hits[reach[-1]] / same.sum()) if reach.size else 0.0
    best_threshold = float(sim[order][reach[-1]]) if reach.size else 1.0
    return PairQuality(
        threshold=threshold,
        precision=tp / max(1, int(predicted.sum())),
        recall=tp / max(1, int(same.sum())),
        copy_pairs=int(same.sum()),
        predicted_pairs=int(predicted.sum()),
        best_recall=best_recall,
        best_threshold=best_threshold,
    )


def embed_corpus(corpus: CopyCorpus, model_spec, batch_size: int = 64) -> np.ndarray:
    """Vectors of every corpus image by a copy-detection model spec (`ModelSpec`), through the embed
    stage's own decoding (`prepare_image`) and model loading, on the CPU."""
    from lvd.embeddings.models import load_embedding_model
    from lvd.embeddings.preprocess import prepare_image

    model = load_embedding_model(model_spec, "cpu")
    cfg = model.preprocess
    out = []
    for start in range(0, len(corpus.images), batch_size):
        batch = np.stack([prepare_image(im.data, cfg) for im in corpus.images[start : start + batch_size]])
        out.append(model.embed_uint8(batch))
    return np.concatenate(out)
