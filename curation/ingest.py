"""Finding images (folders, tar/WebDataset shards, parquet with bytes) and probing each one.

Plain functions; `jobs/stages/ingest.py` runs the listing tasks (`plan_work_units` with a Ray
mapper) and `ingest_unit` over many work units on Ray workers.

Which files a folder contributes: every file that is not hidden (name starting with '.'), whatever its
extension, so nothing under a source folder goes uncounted: a sidecar (json, txt) or a file of an
unsupported format becomes an error row saying so. Symlinked folders are not followed (no cycles); a
broken or looping symlink, a FIFO or a file that cannot be read is a row with an `unreadable` reason.
A glob takes what it matches the same way; a file named literally in the spec must have a known kind.

Every image gets one row in the `images` table whether it is good or not: bad ones have
status "error" and a short reason whose text before the first ':' is stable (`empty file`,
`missing bytes`, `truncated image`, `not an image`, `unsupported format`, `decompression bomb`,
`extreme aspect ratio`, `too small`, `unsupported mode`, `too large`, `corrupt image`,
`unreadable`, `unsafe name`, `wrong column type`). Good images may carry a `note` with the same
prefix rule (`animated` or `multi-frame`: the first frame is used; `exif orientation`: applied
when decoding).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError

from lvd.curation.image_io import IMAGE_FORMATS
from lvd.embeddings.preprocess import to_rgb
from lvd.schemas.job_spec import Source
from lvd.schemas.tables import IMAGES

# Names that say "image": a file named so in the spec is read as one, and so is a tar member (other tar
# members are WebDataset sidecars). HEIC/HEIF are here so they are counted: Pillow has no decoder for
# them, so they become `unsupported format` rows.
IMAGE_EXTENSIONS = frozenset(
    {
        *(".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".tif", ".tiff"),
        *(".avif", ".avifs", ".heic", ".heif"),
    }
)
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet", ".parq")

UnitKind = Literal["files", "tar", "parquet"]


class SourceError(ValueError):
    """A source in the job spec that cannot be used (missing, matches nothing, wrong kind)."""


@dataclass(frozen=True)
class WorkUnit:
    """What one ingest task reads: a chunk of image files, one tar, or one parquet file."""

    dataset: str  # "pool", "seed:<name>" or "eval:<name>"
    kind: UnitKind
    paths: tuple[str, ...]  # files; a single tar / parquet path otherwise
    image_column: str = "image"  # parquet only
    root: str = ""  # the source's root: ids hash the uri relative to it (see `id_key`); "": the whole uri
    root_label: str = ""  # what stands for the root in the id key (the root's name)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "kind": self.kind,
            "paths": list(self.paths),
            "image_column": self.image_column,
            "root": self.root,
            "root_label": self.root_label,
        }

    @classmethod
    def from_dict(cls, d: dict) -> WorkUnit:
        return cls(
            d["dataset"],
            d["kind"],
            tuple(d["paths"]),
            d.get("image_column", "image"),
            d.get("root", ""),
            d.get("root_label", ""),
        )


# ---------------------------------------------------------------------------------------------
# Expanding sources into work units


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> three names (zero padding kept); `{x,y}` -> alternatives; in order."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for c in choices for out in expand_braces(head + c + tail)]


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _ext(path: str) -> str:
    return PurePosixPath(path.split("://", 1)[-1]).suffix.lower()


def _canonical(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Local files as plain paths (so ids do not depend on file:// spelling), others as URLs."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


@dataclass(frozen=True)
class _Match:
    path: str  # canonical
    fs_path: str  # as the filesystem names it
    fs: fsspec.AbstractFileSystem
    literal: bool  # named in the spec (literal or brace item), not found by a glob


def _pattern_matches(pattern: str) -> list[_Match]:
    """What one brace-free pattern names: itself, or what its glob finds (in name order)."""
    fs, fs_path = fsspec.core.url_to_fs(pattern)
    if _has_glob(fs_path):
        # As in a shell and in folder listings, a glob takes hidden names only when it asks for them.
        hidden_ok = PurePosixPath(fs_path).name.startswith(".")
        found = [
            p for p in sorted(fs.glob(fs_path)) if hidden_ok or not PurePosixPath(p).name.startswith(".")
        ]
        return [_Match(_canonical(fs, p), p, fs, False) for p in found]
    return [_Match(_canonical(fs, fs_path), fs_path, fs, True)]


def _exists(match: _Match) -> bool:
    # A broken symlink does not "exist" but is still something the spec named: it gets a row.
    islink = getattr(match.fs, "islink", None)
    return match.fs.exists(match.fs_path) or bool(islink and islink(match.fs_path))


def _kind_of(match: _Match, declared: str) -> str | None:
    """folder | tar | parquet | file, or None when an auto source's file is not something we read."""
    if declared != "auto":
        return "file" if declared == "folder" and not match.fs.isdir(match.fs_path) else declared
    if match.fs.isdir(match.fs_path):
        return "folder"
    ext = _ext(match.path)
    if ext in TAR_EXTENSIONS:
        return "tar"
    if ext in PARQUET_EXTENSIONS:
        return "parquet"
    if ext in IMAGE_EXTENSIONS or not match.literal:
        return "file"  # a glob's match of another extension is still counted (a `not an image` row)
    return None


def _missing_kind(match: _Match, declared: str) -> str | None:
    if not match.literal:
        return None
    if declared in ("tar", "parquet"):
        return declared
    ext = _ext(match.path)
    if ext in TAR_EXTENSIONS:
        return "tar"
    if ext in PARQUET_EXTENSIONS:
        return "parquet"
    return "file"


def _keep(info: dict) -> bool:
    """Whether a folder listing entry gets a row: anything not hidden that is not a folder being walked
    (files, symlinks of any kind, FIFOs...), so nothing under a source folder goes uncounted."""
    if PurePosixPath(info["name"]).name.startswith("."):
        return False
    return info.get("type") != "directory" or bool(info.get("islink"))


def _chunks(paths: list[str], size: int) -> Iterator[tuple[str, ...]]:
    for i in range(0, len(paths), size):
        yield tuple(paths[i : i + size])


# ---------------------------------------------------------------------------------------------
# Listing in rounds of tasks
#
# The caller expands only brace patterns (names, no I/O). Tasks resolve each name (glob, exists,
# kind), list folders one level at a time until there are enough subtrees to share out, then walk
# the subtrees. A `Mapper` runs each round's tasks: `map_in_process`, or Ray workers in the ingest
# stage. The caller assembles the units in source order from the results, so the units and their
# numbering do not depend on how the listing was split.

Mapper = Callable[[Callable[[Any], Any], list], list]

TASKS_PER_WORKER = 4  # tasks per round per worker: a slow listing does not hold up a whole round
MAX_GROUP = 256  # names or folders one task handles at most
MAX_SPLIT_DEPTH = 4  # folder levels listed one by one before the rest is walked whole


def map_in_process(fn: Callable[[Any], Any], items: list) -> list:
    """The Mapper that runs every task here, one after another."""
    return [fn(item) for item in items]


@dataclass(frozen=True)
class Match:
    """One file or folder a source names, as a listing task found it."""

    path: str  # canonical: a plain path for local files, a URL otherwise
    literal: bool  # named in the spec (literal or brace item), not found by a glob
    exists: bool
    kind: str | None  # folder | tar | parquet | file; None: nothing ingest reads


@dataclass(frozen=True)
class SourceSet:
    """The sources of one dataset ("pool", "seed:<name>", "eval:<name>"); `what` names a source in errors."""

    dataset: str
    sources: Sequence[Source]
    what: str = "source"


def resolve_patterns(group: list[tuple[str, str]]) -> list[list[Match] | str]:
    """Task: each (brace-free pattern, declared kind) -> its matches, or why they could not be looked up."""
    out: list[list[Match] | str] = []
    for pattern, declared in group:
        try:
            matches = []
            for m in _pattern_matches(pattern):
                exists = _exists(m)
                kind = _kind_of(m, declared) if exists else _missing_kind(m, declared)
                matches.append(Match(m.path, m.literal, exists, kind))
            out.append(matches)
        except Exception as err:  # noqa: BLE001 - a store's errors have many types; the caller names the source
            out.append(f"{type(err).__name__}: {err}")
    return out


def list_folder_level(group: list[str]) -> list[tuple[list[str], list[str]]]:
    """Task: each folder -> (the files to ingest directly in it, its subfolders).

    One level of the same walk `fs.find` does, so levels plus `list_folder_tree` of the subfolders
    give exactly what one `find` of the folder gives.
    """
    out = []
    for folder in group:
        fs, fs_path = fsspec.core.url_to_fs(folder)
        files: list[str] = []
        subfolders: list[str] = []
        for _, dirs, entries in fs.walk(fs_path, maxdepth=1, detail=True):
            files = [_canonical(fs, info["name"]) for info in entries.values() if _keep(info)]
            subfolders = [_canonical(fs, info["name"].rstrip("/")) for info in dirs.values()]
        out.append((files, subfolders))
    return out


def list_folder_tree(group: list[str]) -> list[list[str]]:
    """Task: each folder -> every file to ingest below it, at any depth."""
    out = []
    for folder in group:
        fs, fs_path = fsspec.core.url_to_fs(folder)
        out.append(
            [
                _canonical(fs, info["name"])
                for _, _, entries in fs.walk(fs_path, detail=True)
                for info in entries.values()
                if _keep(info)
            ]
        )
    return out


def _run(mapper: Mapper, fn: Callable[[list], list], items: list, parallelism: int) -> list:
    """`fn` over `items` in groups (one task each); the results flat, in item order."""
    if not items:
        return []
    size = max(1, min(MAX_GROUP, -(-len(items) // (TASKS_PER_WORKER * max(1, parallelism)))))
    groups = [items[i : i + size] for i in range(0, len(items), size)]
    return [r for results in mapper(fn, groups) for r in results]


def _pattern_item(pattern: str, declared: str) -> tuple[str, str]:
    # Local paths are made absolute here: a worker's working folder is not the caller's.
    fs, fs_path = fsspec.core.url_to_fs(pattern)
    return (fs_path if isinstance(fs, LocalFileSystem) else pattern), declared


def _resolve(sets: Sequence[SourceSet], mapper: Mapper, parallelism: int) -> list[list[list[Match]]]:
    """Matches per source per set; a source whose lookup failed is a SourceError naming it."""
    items, owners = [], []
    for d, s in enumerate(sets):
        for k, src in enumerate(s.sources):
            for pattern in expand_braces(src.uri):
                items.append(_pattern_item(pattern, src.kind))
                owners.append((d, k))
    found: list[list[list[Match]]] = [[[] for _ in s.sources] for s in sets]
    for (d, k), result in zip(owners, _run(mapper, resolve_patterns, items, parallelism), strict=True):
        if isinstance(result, str):
            raise SourceError(f"{sets[d].what} {sets[d].sources[k].uri!r}: cannot list it: {result}")
        found[d][k] += result
    return found


def _check(src: Source, matches: list[Match], what: str) -> None:
    existing = [m for m in matches if m.exists]
    if not existing:
        raise SourceError(f"{what} {src.uri!r}: no such file or folder (nothing matches)")
    if src.kind == "folder" and not any(m.kind == "folder" for m in existing):
        raise SourceError(f"{what} {src.uri!r}: kind is 'folder' but it is not a folder")
    unknown = [m.path for m in existing if m.literal and m.kind is None]
    if unknown:
        raise SourceError(
            f"{what} {src.uri!r}: cannot tell what {unknown[0]!r} is (not a folder, .tar, .parquet "
            "or image); set kind: folder | tar | parquet"
        )
    parquets = [m for m in existing if m.kind == "parquet"]
    if parquets:  # one footer per source
        with fsspec.open(parquets[0].path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if src.image_column not in names:
            raise SourceError(
                f"{what} {src.uri!r}: {parquets[0].path} has no column {src.image_column!r} (columns: "
                f"{names}); set image_column"
            )


def _list_folders(roots: list[str], mapper: Mapper, parallelism: int) -> list[list[str]]:
    """The sorted files to ingest under each folder."""
    files: list[list[str]] = [[] for _ in roots]
    frontier = list(enumerate(roots))
    depth = 0
    while frontier and len(frontier) < TASKS_PER_WORKER * parallelism and depth < MAX_SPLIT_DEPTH:
        levels = _run(mapper, list_folder_level, [f for _, f in frontier], parallelism)
        below = []
        for (i, _), (level_files, subfolders) in zip(frontier, levels, strict=True):
            files[i] += level_files
            below += [(i, sub) for sub in subfolders]
        frontier, depth = below, depth + 1
    trees = _run(mapper, list_folder_tree, [f for _, f in frontier], parallelism)
    for (i, _), tree in zip(frontier, trees, strict=True):
        files[i] += tree
    return [sorted(f) for f in files]


def check_sources(sources: Sequence[Source], what: str = "source") -> None:
    """Fail when a source cannot be right: matches nothing, a missing folder, a file of unknown kind,
    a parquet without the image column.

    Missing items of a brace pattern whose other items exist are not spec errors: they become
    `unreadable` rows so the rest of the data is still ingested.
    """
    (found,) = _resolve([SourceSet("", sources, what)], map_in_process, 1)
    for src, matches in zip(sources, found, strict=True):
        _check(src, matches, what)


def plan_work_units(
    sets: Sequence[SourceSet],
    files_per_part: int,
    *,
    mapper: Mapper = map_in_process,
    parallelism: int = 1,
    check: bool = True,
) -> list[WorkUnit]:
    """Every work unit of `sets`, in set order, numbered by position; no image is read.

    With `check`, every source is checked (as `check_sources`) once its names are resolved and before
    any folder is listed. Per set: each folder's files are chunked by `files_per_part`; loose image
    files (globs) are chunked together after the folders; each tar and parquet file is one unit. A
    path named by several sources of a set is listed once (image ids must stay unique). A missing
    file named by a brace pattern still gets a unit, and so an `unreadable` row. `parallelism`: how
    many tasks `mapper` runs at once (sizes the rounds).
    """
    if files_per_part < 1:
        raise ValueError("files_per_part must be >= 1")
    found = _resolve(sets, mapper, parallelism)
    if check:
        for s, per_source in zip(sets, found, strict=True):
            for src, matches in zip(s.sources, per_source, strict=True):
                _check(src, matches, s.what)
    roots = [
        m.path
        for s, per_source in zip(sets, found, strict=True)
        for src, matches in zip(s.sources, per_source, strict=True)
        for m in matches
        if m.kind == "folder"
    ]
    folder_files = iter(_list_folders(roots, mapper, parallelism))

    units: list[WorkUnit] = []
    for s, per_source in zip(sets, found, strict=True):
        units += _assemble(s, per_source, folder_files, files_per_part)
    return units


_WILD = re.compile(r"[*?\[{]")


def source_root(uri: str, literal_folder: bool) -> str:
    """The folder a source's paths are taken relative to for ids: the pattern up to its first
    component with a glob or brace; for a literal name, the folder itself or a file's folder."""
    fs, fs_path = fsspec.core.url_to_fs(uri)
    pattern = (fs_path if isinstance(fs, LocalFileSystem) else uri).rstrip("/")
    parts = pattern.split("/")
    wild = next((i for i, p in enumerate(parts) if _WILD.search(p)), None)
    if wild is not None:
        return "/".join(parts[:wild]) or "/"
    return pattern if literal_folder else ("/".join(parts[:-1]) or "/")


def root_labels(roots: Sequence[str]) -> list[str]:
    """A label per source root: the root's name; a later root with the name of an earlier, different
    root gets `~2`, `~3`, ... so two folders named alike cannot give two images one id. Labels depend
    only on the sources before, so a source added at the end changes no earlier label."""
    labels: dict[str, str] = {}
    taken: set[str] = set()
    for root in roots:
        if root in labels:
            continue
        name = PurePosixPath(root.split("://", 1)[-1]).name
        label, n = name, 1
        while label in taken:
            n += 1
            label = f"{name}~{n}"
        labels[root] = label
        taken.add(label)
    return [labels[r] for r in roots]


def id_key(uri: str, root: str, root_label: str) -> str:
    """What an image id hashes besides the dataset: the root's label and the uri relative to the root
    (`folder/cls/img.png`, `pool/pool-000.tar#key.jpg`), so ids survive moving the pool; a uri outside
    the root (or no root) keys by itself."""
    prefix = root if root.endswith("/") else root + "/"
    if root and uri.startswith(prefix):
        return f"{root_label}/{uri[len(prefix) :]}"
    return uri


def _assemble(
    s: SourceSet, found: list[list[Match]], folder_files: Iterator[list[str]], files_per_part: int
) -> list[WorkUnit]:
    """One set's units from its matches, in source order; `folder_files` yields each folder's files.

    Loose files (globs, literal image files) are chunked together after the folders; each chunk is
    split where the source root changes, so every unit has one root."""
    units: list[WorkUnit] = []
    seen: set[str] = set()
    loose: list[tuple[str, int]] = []
    roots = [
        source_root(src.uri, any(m.kind == "folder" and m.literal for m in matches))
        for src, matches in zip(s.sources, found, strict=True)
    ]
    labels = root_labels(roots)

    def fresh(paths: list[str]) -> list[str]:
        new = [p for p in paths if p not in seen]
        seen.update(new)
        return new

    for k, (src, matches) in enumerate(zip(s.sources, found, strict=True)):
        root = {"root": roots[k], "root_label": labels[k]}
        for m in matches:
            if m.kind == "folder":
                files = fresh(next(folder_files))
                units += [WorkUnit(s.dataset, "files", c, **root) for c in _chunks(files, files_per_part)]
            elif m.kind in ("tar", "parquet"):
                if fresh([m.path]):
                    units.append(WorkUnit(s.dataset, m.kind, (m.path,), src.image_column, **root))
            elif m.kind == "file":
                loose += [(p, k) for p in fresh([m.path])]
    for c in _chunks(sorted(loose), files_per_part):
        start = 0
        for i in range(1, len(c) + 1):
            if i == len(c) or c[i][1] != c[start][1]:
                k = c[start][1]
                paths = tuple(p for p, _ in c[start:i])
                units.append(WorkUnit(s.dataset, "files", paths, root=roots[k], root_label=labels[k]))
                start = i
    return units


def list_work_units(
    sources: Sequence[Source],
    dataset: str,
    files_per_part: int,
    *,
    mapper: Mapper = map_in_process,
    parallelism: int = 1,
) -> list[WorkUnit]:
    """The work units of one dataset's sources, unchecked (see `plan_work_units`)."""
    return plan_work_units(
        [SourceSet(dataset, sources)], files_per_part, mapper=mapper, parallelism=parallelism, check=False
    )


# ---------------------------------------------------------------------------------------------
# Probing one image


_PIL_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")
Image.init()  # registers every plugin: open(formats=...) looks them up by name
# The only decoders probe_image lets Pillow try (MPO comes through JPEG's; AVIF needs Pillow >= 11.3).
_ACCEPTED = tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)
# ISO-BMFF major brands (bytes 8-12 after an 'ftyp' box) of HEIF stills and of AVIF.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_EXIF_ORIENTATION = 0x0112
ANIMATED_FORMATS = frozenset({"gif", "png", "webp", "avif"})


def _result(width=None, height=None, fmt=None, error: str | None = None, note: str | None = None) -> dict:
    return {
        "width": width,
        "height": height,
        "format": fmt,
        "status": "error" if error else "ok",
        "error": error,
        "note": None if error else note,
    }


def _webp_truncated(data: bytes) -> bool:
    # libwebp reports a cut file only as "could not create decoder object": check the RIFF size.
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def _unidentified(data: bytes) -> str:
    """Why no accepted decoder opens `data`: a format we can name, or not an image."""
    brand = data[8:12] if data[4:8] == b"ftyp" else b""
    if brand in _HEIF_BRANDS:
        return "unsupported format: heif (Pillow has no decoder for it)"
    if brand in _AVIF_BRANDS:
        return "unsupported format: avif (this Pillow has no AVIF decoder)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Only the header is read to name the format: no decoder runs (some start other programs).
            with Image.open(io.BytesIO(data)) as other:
                return f"unsupported format: {(other.format or 'unknown').lower()}"
    except Exception:  # noqa: BLE001 - nothing Pillow knows: the plain answer
        return "not an image"


def probe_image(
    data: bytes, max_pixels: int, *, min_side: int = 1, max_aspect_ratio: float | None = None
) -> dict:
    """width, height, format, status ("ok" | "error"), error (reason) and note of one encoded image.

    Only the formats in IMAGE_FORMATS are opened. The header is read first (PIL's open is lazy) and the
    pixel count, the aspect ratio (longer side over shorter side) and the shorter side are checked
    before anything is decoded or resized; then the first frame is decoded whole (JPEG at 1/8 scale
    via draft(), which still reads every byte) so truncated files are caught here rather than in
    training. width and height are as displayed, after the EXIF orientation.
    """
    if not data:
        return _result(error="empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS (our max_pixels is the cap that counts) and on
            # damaged metadata (the outcome is in the result): no log spam per image.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=_ACCEPTED)
    except Image.DecompressionBombError as err:
        m = _PIL_BOMB.search(str(err))
        detail = f"{m.group(1)} pixels > PIL limit {m.group(2)}" if m else "over PIL's pixel limit"
        return _result(error=f"decompression bomb: {detail}")
    except UnidentifiedImageError:
        return _result(error=_unidentified(data))
    except Exception as err:  # PIL's plugins raise many types on malformed headers; all are bad data
        return _result(error=_decode_reason(err, data))
    with img:
        width, height = img.size
        fmt = (img.format or "unknown").lower()
        if fmt == "mpo":  # multi-picture JPEG from cameras; the first picture is a plain JPEG
            fmt = "jpeg"
        if width <= 0 or height <= 0:
            return _result(width, height, fmt, "corrupt image: zero size")
        if width * height > max_pixels:
            return _result(width, height, fmt, f"decompression bomb: {width} x {height} > {max_pixels}")
        longer, shorter = max(width, height), min(width, height)
        if max_aspect_ratio is not None and longer > max_aspect_ratio * shorter:
            return _result(
                width,
                height,
                fmt,
                f"extreme aspect ratio: {width} x {height} ({longer / shorter:.1f}:1 > {max_aspect_ratio:g}:1)",
            )
        if shorter < min_side:
            return _result(width, height, fmt, f"too small: {width} x {height} (shorter side < {min_side})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames = int(getattr(img, "n_frames", 1))  # GIF: walks the frame headers
                if frames > 1:
                    img.seek(0)
                if fmt == "jpeg":
                    img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
                orientation = img.getexif().get(_EXIF_ORIENTATION)
        except Image.DecompressionBombError:
            return _result(width, height, fmt, f"decompression bomb: {width} x {height} over PIL's limit")
        except Exception as err:  # as above: any decoder failure means the stream is bad
            return _result(width, height, fmt, _decode_reason(err, data))
        try:
            # Odd modes (CMYK, I;16, F, 1, P, LA) are fine if they convert as the embed stage converts
            # them; try it on one pixel.
            to_rgb(img.crop((0, 0, 1, 1)))
        except Exception:  # noqa: BLE001 - any failure means the embed stage could not use it either
            return _result(width, height, fmt, f"unsupported mode: {img.mode}")
    notes = []
    if frames > 1 and fmt in ANIMATED_FORMATS:
        notes.append(f"animated: {frames} frames, the first is used")
    elif frames > 1:  # TIFF pages, MPO pictures
        notes.append(f"multi-frame: {frames} frames, the first is used")
    if isinstance(orientation, int) and 2 <= orientation <= 8:
        notes.append(f"exif orientation: {orientation}, applied when decoding")
        if orientation >= 5:  # 5-8 turn the picture a quarter: the displayed sides swap
            width, height = height, width
    return _result(width, height, fmt, note="; ".join(notes) or None)


def _decode_reason(err: BaseException, data: bytes) -> str:
    msg = str(err)
    if "truncated" in msg.lower() or isinstance(err, EOFError) or _webp_truncated(data):
        return "truncated image"
    return f"corrupt image: {type(err).__name__}: {msg[:120]}"


# ---------------------------------------------------------------------------------------------
# Ids and one work unit


def stable_image_id(dataset: str, key: str) -> int:
    """A non-negative int64 from blake2b(dataset, key): the same on every run and machine.

    `key` is `id_key(uri, ...)`: the path relative to the source root, so moving the pool keeps ids.
    63 bits, not 53: at a billion images 53-bit hashes would be expected to collide (n^2 / 2^54 pairs).
    Readers that go through float64 (pandas with nulls, JSON in JavaScript) get ids as strings or
    Arrow-backed integers (`schemas.ids`)."""
    digest = hashlib.blake2b(f"{dataset}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def _unreadable(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"unreadable: {type(err).__name__}: {err.strerror}"
    return f"unreadable: {type(err).__name__}: {str(err)[:120]}"


def _is_utf8(name: str | None) -> bool:
    # Listings decode undecodable bytes of a file name as surrogates (PEP 383); Arrow strings cannot hold them.
    if name is None:
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str | None) -> str | None:
    """A name with its undecodable bytes written as \\xNN, so the row can still say which file it is."""
    if name is None or _is_utf8(name):
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


NOT_UTF8 = "unsafe name: not UTF-8 (the file cannot be named in the images table)"


class _Rows:
    """Accumulates rows of the images table column by column."""

    def __init__(
        self,
        dataset: str,
        max_pixels: int,
        min_side: int,
        max_aspect_ratio: float | None,
        root: str = "",
        root_label: str = "",
    ):
        self.dataset = dataset
        self.root, self.root_label = root, root_label
        self.limits = {"max_pixels": max_pixels, "min_side": min_side, "max_aspect_ratio": max_aspect_ratio}
        self.cols: dict[str, list] = {name: [] for name in IMAGES.names}

    def add(
        self, uri, kind, path, member=None, offset=None, data: bytes | None = None, error=None, size=None
    ):
        if error is None and not all(_is_utf8(v) for v in (uri, path, member)):
            error, data = NOT_UTF8, None
        uri, path, member = _printable(uri), _printable(path), _printable(member)
        if data is not None and error is None:
            probe = probe_image(data, **self.limits)
        else:
            probe = _result(error=error)
        row = {
            "image_id": stable_image_id(self.dataset, id_key(uri, self.root, self.root_label)),
            "dataset": self.dataset,
            "uri": uri,
            "kind": kind,
            "path": path,
            "member": member,
            "offset": offset,
            "size": len(data) if data is not None else size,
            "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
            **probe,
        }
        for name, value in row.items():
            self.cols[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=IMAGES)


def _too_large(size: int) -> str:
    return f"too large: {size} bytes"


def _not_regular(path: str) -> str:
    """What a listed path that is neither a file nor a folder is (FIFO, socket, device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "not a regular file"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device")):
        if test(mode):
            return f"not a regular file: {name}"
    return "not a regular file"


def _ingest_files(unit: WorkUnit, rows: _Rows, max_bytes: int) -> None:
    for path in unit.paths:
        if not _is_utf8(path):
            rows.add(path, "file", path, error=NOT_UTF8)
            continue
        ext = _ext(path)
        if ext in TAR_EXTENSIONS or ext in PARQUET_EXTENSIONS:
            rows.add(
                path,
                "file",
                path,
                error=f"unsupported format: {ext[1:]} inside a folder (name it as a source)",
            )
            continue
        try:
            fs, fs_path = fsspec.core.url_to_fs(path)
            info = fs.info(fs_path)  # follows symlinks: a broken or looping one raises here
            if info.get("type") == "directory":
                if info.get("islink"):
                    rows.add(path, "file", path, error="unreadable: a symlink to a folder (not followed)")
                    continue
                raise IsADirectoryError(21, "Is a directory")
            if info.get("type") != "file":  # a FIFO would block the read forever
                rows.add(path, "file", path, error=f"unreadable: {_not_regular(fs_path)}")
                continue
            size = info.get("size")
            if size is not None and size > max_bytes:
                rows.add(path, "file", path, error=_too_large(size), size=size)
                continue
            with fs.open(fs_path, "rb") as f:
                data = f.read(max_bytes + 1)  # a file that grew since it was listed is still capped
            if len(data) > max_bytes:
                rows.add(path, "file", path, error=_too_large(len(data)), size=len(data))
                continue
        except (OSError, ValueError) as err:
            rows.add(path, "file", path, error=_unreadable(err))
            continue
        rows.add(path, "file", path, data=data)


def _unsafe_member(name: str) -> str | None:
    """Why a tar member name must not be used: it would land outside the folder it is extracted to."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return "unsafe name: absolute path in a tar member"
    if ".." in name.replace("\\", "/").split("/"):
        return "unsafe name: '..' in a tar member"
    return None


def _ingest_tar(unit: WorkUnit, rows: _Rows, max_bytes: int) -> None:
    (path,) = unit.paths
    seen: set[str] = set()
    try:
        with fsspec.open(path, "rb") as f:
            # "r:" (uncompressed only): recorded offsets must address the member bytes in the file.
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isdir() or _ext(member.name) not in IMAGE_EXTENSIONS:
                        continue  # WebDataset sidecars (.json, .cls, .txt) and folders
                    uri = f"{path}#{member.name}"

                    def reject(reason: str, uri: str = uri, member: tarfile.TarInfo = member) -> None:
                        rows.add(
                            uri, "tar", path, member.name, member.offset_data, error=reason, size=member.size
                        )

                    if member.name in seen:  # the same uri twice: the later one gets its own
                        reject(
                            "duplicate name: an earlier member of this tar has it", f"{uri}@{member.offset}"
                        )
                        continue
                    seen.add(member.name)
                    unsafe = _unsafe_member(member.name)
                    if unsafe:
                        reject(unsafe)
                    elif not member.isfile():
                        reject(f"unreadable: a {'symlink' if member.issym() else 'link or special'} member")
                    elif member.size > max_bytes:
                        reject(_too_large(member.size))
                    else:
                        data = tar.extractfile(member).read()
                        if len(data) != member.size:
                            reject("truncated image")
                        else:
                            rows.add(uri, "tar", path, member.name, member.offset_data, data=data)
    except (OSError, tarfile.TarError, EOFError) as err:
        # A missing or cut tar: one row for the tar itself; members read before the cut stay.
        rows.add(path, "tar", path, error=_unreadable(err))


PARQUET_BATCH_ROWS = 1  # rows decoded at a time: with buffered reads, one image (or one page) in memory
PARQUET_READ_BUFFER = 1 << 16


def _bytes_path(field: pa.Field) -> str | None:
    """The column path holding image bytes: the column itself, or the `bytes` field of a struct
    (Hugging Face datasets' Image feature); None when the column cannot hold encoded images."""
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    if any(test(field.type) for test in binary) or str(field.type) == "binary_view":
        return field.name
    if pa.types.is_struct(field.type):
        idx = field.type.get_field_index("bytes")
        if idx >= 0 and _bytes_path(field.type.field(idx)) is not None:
            return f"{field.name}.bytes"
    return None


def _ingest_parquet(unit: WorkUnit, rows: _Rows, max_bytes: int) -> None:
    (path,) = unit.paths
    column = unit.image_column
    try:
        with fsspec.open(path, "rb") as f:
            # Buffered, not pre-buffered: column chunks are read a buffer at a time, never a whole row
            # group, and each row's length comes from the Arrow offsets before its bytes are copied.
            pf = pq.ParquetFile(f, buffer_size=PARQUET_READ_BUFFER, pre_buffer=False)
            if column not in pf.schema_arrow.names:
                raise ValueError(f"no column {column!r}")
            field = pf.schema_arrow.field(column)
            read_path = _bytes_path(field)
            if read_path is None:
                reason = f"wrong column type: {column!r} is {field.type}, not binary or a struct with bytes"
                for row in range(pf.metadata.num_rows):
                    rows.add(f"{path}#row={row}", "parquet", path, column, row, error=reason)
                return
            row = 0
            for batch in pf.iter_batches(PARQUET_BATCH_ROWS, columns=[read_path], use_threads=False):
                values = batch.column(0)
                valid = values.is_valid()
                if pa.types.is_struct(values.type):
                    values = values.field("bytes")
                    valid = pc.and_(valid, values.is_valid())
                lengths = pc.binary_length(values)
                for i in range(len(values)):
                    uri = f"{path}#row={row}"
                    n = lengths[i].as_py()
                    if not valid[i].as_py() or n is None:
                        rows.add(
                            uri, "parquet", path, column, row, error=f"missing bytes: null in {column!r}"
                        )
                    elif n > max_bytes:
                        rows.add(uri, "parquet", path, column, row, error=_too_large(n), size=n)
                    else:
                        rows.add(uri, "parquet", path, column, row, data=values[i].as_py())
                    row += 1
    except (OSError, ValueError, pa.ArrowException) as err:
        rows.add(path, "parquet", path, column, error=_unreadable(err))


def ingest_unit(
    unit: WorkUnit,
    max_pixels: int,
    max_bytes: int,
    *,
    min_side: int = 1,
    max_aspect_ratio: float | None = None,
) -> pa.Table:
    """Read and probe every image of a work unit: one `images` row per image, good or bad.

    The limits are the job spec's `ingest` section; min_side and max_aspect_ratio default to none."""
    rows = _Rows(unit.dataset, max_pixels, min_side, max_aspect_ratio, unit.root, unit.root_label)
    if unit.kind == "files":
        _ingest_files(unit, rows, max_bytes)
    elif unit.kind == "tar":
        _ingest_tar(unit, rows, max_bytes)
    elif unit.kind == "parquet":
        _ingest_parquet(unit, rows, max_bytes)
    else:
        raise ValueError(f"unknown work unit kind {unit.kind!r}")
    return rows.table()


def reason_prefix(error: str) -> str:
    """`truncated image` from `truncated image`, `unreadable` from `unreadable: ...`."""
    return error.split(":", 1)[0]
