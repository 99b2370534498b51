"""Finding images (folders, tar/WebDataset shards, parquet with bytes) and probing each one.

Plain functions; `jobs/stages/ingest.py` runs the listing tasks (`plan_work_units` with a Ray
mapper) and `ingest_unit` over many work units on Ray workers.

Which files a folder contributes: with `kind: auto` only files with an image extension
(IMAGE_EXTENSIONS), so sidecars (json, txt, READMEs) are left alone; with `kind: folder` every
non-hidden file, for pools whose files have no extension (non-images then become
`not an image` rows). Symlinked folders are not followed (no cycles); a broken symlink is a row
with an `unreadable` reason.

Every image gets one row in the `images` table whether it is good or not: bad ones have
status "error" and a short reason whose text before the first ':' is stable (`empty file`,
`truncated image`, `not an image`, `decompression bomb`, `unsupported mode`, `too large`,
`corrupt image`, `unreadable`).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError

from lvd.schemas.job_spec import Source
from lvd.schemas.tables import IMAGES

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
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

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "kind": self.kind,
            "paths": list(self.paths),
            "image_column": self.image_column,
        }

    @classmethod
    def from_dict(cls, d: dict) -> WorkUnit:
        return cls(d["dataset"], d["kind"], tuple(d["paths"]), d.get("image_column", "image"))


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
        return [_Match(_canonical(fs, p), p, fs, False) for p in sorted(fs.glob(fs_path))]
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
    if ext in IMAGE_EXTENSIONS:
        return "file"
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


def _keep(info: dict, every_file: bool) -> bool:
    """Whether a folder listing entry is a file to ingest: not hidden, a file (or a symlink that is
    not a folder), with an image extension unless the source takes every file."""
    if PurePosixPath(info["name"]).name.startswith("."):
        return False
    is_file = info.get("type") == "file" or (info.get("islink") and info.get("type") != "directory")
    return bool(is_file) and (every_file or _ext(info["name"]) in IMAGE_EXTENSIONS)


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


def list_folder_level(group: list[tuple[str, bool]]) -> list[tuple[list[str], list[str]]]:
    """Task: each (folder, every_file) -> (the files to ingest directly in it, its subfolders).

    One level of the same walk `fs.find` does, so levels plus `list_folder_tree` of the subfolders
    give exactly what one `find` of the folder gives.
    """
    out = []
    for folder, every_file in group:
        fs, fs_path = fsspec.core.url_to_fs(folder)
        files: list[str] = []
        subfolders: list[str] = []
        for _, dirs, entries in fs.walk(fs_path, maxdepth=1, detail=True):
            files = [_canonical(fs, info["name"]) for info in entries.values() if _keep(info, every_file)]
            subfolders = [_canonical(fs, info["name"].rstrip("/")) for info in dirs.values()]
        out.append((files, subfolders))
    return out


def list_folder_tree(group: list[tuple[str, bool]]) -> list[list[str]]:
    """Task: each (folder, every_file) -> every file to ingest below it, at any depth."""
    out = []
    for folder, every_file in group:
        fs, fs_path = fsspec.core.url_to_fs(folder)
        out.append(
            [
                _canonical(fs, info["name"])
                for _, _, entries in fs.walk(fs_path, detail=True)
                for info in entries.values()
                if _keep(info, every_file)
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


def _list_folders(roots: list[tuple[str, bool]], mapper: Mapper, parallelism: int) -> list[list[str]]:
    """The sorted files to ingest under each (folder, every_file)."""
    files: list[list[str]] = [[] for _ in roots]
    frontier = [(i, folder, every) for i, (folder, every) in enumerate(roots)]
    depth = 0
    while frontier and len(frontier) < TASKS_PER_WORKER * parallelism and depth < MAX_SPLIT_DEPTH:
        levels = _run(mapper, list_folder_level, [(f, e) for _, f, e in frontier], parallelism)
        below = []
        for (i, _, every), (level_files, subfolders) in zip(frontier, levels, strict=True):
            files[i] += level_files
            below += [(i, sub, every) for sub in subfolders]
        frontier, depth = below, depth + 1
    trees = _run(mapper, list_folder_tree, [(f, e) for _, f, e in frontier], parallelism)
    for (i, _, _), tree in zip(frontier, trees, strict=True):
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
        (m.path, src.kind == "folder")
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


def _assemble(
    s: SourceSet, found: list[list[Match]], folder_files: Iterator[list[str]], files_per_part: int
) -> list[WorkUnit]:
    """One set's units from its matches, in source order; `folder_files` yields each folder's files."""
    units: list[WorkUnit] = []
    seen: set[str] = set()
    loose: list[str] = []

    def fresh(paths: list[str]) -> list[str]:
        new = [p for p in paths if p not in seen]
        seen.update(new)
        return new

    for src, matches in zip(s.sources, found, strict=True):
        for m in matches:
            if m.kind == "folder":
                files = fresh(next(folder_files))
                units += [WorkUnit(s.dataset, "files", c) for c in _chunks(files, files_per_part)]
            elif m.kind in ("tar", "parquet"):
                if fresh([m.path]):
                    units.append(WorkUnit(s.dataset, m.kind, (m.path,), src.image_column))
            elif m.kind == "file":
                loose += fresh([m.path])
    return units + [WorkUnit(s.dataset, "files", c) for c in _chunks(sorted(loose), files_per_part)]


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


def _result(width=None, height=None, fmt=None, error: str | None = None) -> dict:
    return {
        "width": width,
        "height": height,
        "format": fmt,
        "status": "error" if error else "ok",
        "error": error,
    }


def _webp_truncated(data: bytes) -> bool:
    # libwebp reports a cut file only as "could not create decoder object": check the RIFF size.
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def probe_image(data: bytes, max_pixels: int) -> dict:
    """width, height, format, status ("ok" | "error") and error (reason) of one encoded image.

    The header is read first (PIL's open is lazy) and the pixel count checked before anything
    is decoded; then the whole stream is decoded (JPEG at 1/8 scale via draft(), which still
    reads every byte) so truncated files are caught here rather than in training.
    """
    if not data:
        return _result(error="empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS (our max_pixels is the cap that counts) and on
            # damaged metadata (the outcome is in the result): no log spam per image.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        m = _PIL_BOMB.search(str(err))
        detail = f"{m.group(1)} pixels > PIL limit {m.group(2)}" if m else "over PIL's pixel limit"
        return _result(error=f"decompression bomb: {detail}")
    except UnidentifiedImageError:
        return _result(error="not an image")
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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if fmt == "jpeg":
                    img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
        except Image.DecompressionBombError:
            return _result(width, height, fmt, f"decompression bomb: {width} x {height} over PIL's limit")
        except Exception as err:  # as above: any decoder failure means the stream is bad
            return _result(width, height, fmt, _decode_reason(err, data))
        try:
            # Odd modes (CMYK, I;16, P, LA) are fine if they convert to RGB; try it on one pixel.
            img.crop((0, 0, 1, 1)).convert("RGB")
        except Exception:
            return _result(width, height, fmt, f"unsupported mode: {img.mode}")
    return _result(width, height, fmt)


def _decode_reason(err: BaseException, data: bytes) -> str:
    msg = str(err)
    if "truncated" in msg.lower() or isinstance(err, EOFError) or _webp_truncated(data):
        return "truncated image"
    return f"corrupt image: {type(err).__name__}: {msg[:120]}"


# ---------------------------------------------------------------------------------------------
# Ids and one work unit


def stable_image_id(dataset: str, uri: str) -> int:
    """A non-negative int64 from blake2b(dataset, uri): the same on every run and machine."""
    digest = hashlib.blake2b(f"{dataset}\x00{uri}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def _unreadable(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"unreadable: {type(err).__name__}: {err.strerror}"
    return f"unreadable: {type(err).__name__}: {str(err)[:120]}"


class _Rows:
    """Accumulates rows of the images table column by column."""

    def __init__(self, dataset: str, max_pixels: int):
        self.dataset = dataset
        self.max_pixels = max_pixels
        self.cols: dict[str, list] = {name: [] for name in IMAGES.names}

    def add(
        self, uri, kind, path, member=None, offset=None, data: bytes | None = None, error=None, size=None
    ):
        if data is not None and error is None:
            probe = probe_image(data, self.max_pixels)
        else:
            probe = _result(error=error)
        row = {
            "image_id": stable_image_id(self.dataset, uri),
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


def _ingest_files(unit: WorkUnit, rows: _Rows, max_bytes: int) -> None:
    for path in unit.paths:
        try:
            fs, fs_path = fsspec.core.url_to_fs(path)
            size = fs.size(fs_path)
            if fs.isdir(fs_path):
                raise IsADirectoryError(21, "Is a directory")
            if size is not None and size > max_bytes:
                rows.add(path, "file", path, error=_too_large(size), size=size)
                continue
            with fs.open(fs_path, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as err:
            rows.add(path, "file", path, error=_unreadable(err))
            continue
        rows.add(path, "file", path, data=data)


def _ingest_tar(unit: WorkUnit, rows: _Rows, max_bytes: int) -> None:
    (path,) = unit.paths
    try:
        with fsspec.open(path, "rb") as f:
            # "r:" (uncompressed only): recorded offsets must address the member bytes in the file.
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isfile() or _ext(member.name) not in IMAGE_EXTENSIONS:
                        continue  # WebDataset sidecars (.json, .cls, .txt) and folders
                    uri = f"{path}#{member.name}"
                    if member.size > max_bytes:
                        rows.add(
                            uri,
                            "tar",
                            path,
                            member.name,
                            member.offset_data,
                            error=_too_large(member.size),
                            size=member.size,
                        )
                        continue
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        rows.add(
                            uri,
                            "tar",
                            path,
                            member.name,
                            member.offset_data,
                            error="truncated image",
                            size=member.size,
                        )
                        continue
                    rows.add(uri, "tar", path, member.name, member.offset_data, data=data)
    except (OSError, tarfile.TarError, EOFError) as err:
        # A missing or cut tar: one row for the tar itself; members read before the cut stay.
        rows.add(path, "tar", path, error=_unreadable(err))


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value


def _ingest_parquet(unit: WorkUnit, rows: _Rows, max_bytes: int) -> None:
    (path,) = unit.paths
    column = unit.image_column
    try:
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if column not in pf.schema_arrow.names:
                raise ValueError(f"no column {column!r}")
            row = 0
            # One row group at a time bounds memory to a row group's bytes.
            for rg in range(pf.num_row_groups):
                for value in pf.read_row_group(rg, columns=[column]).column(0).to_pylist():
                    uri = f"{path}#row={row}"
                    data = _image_bytes(value)
                    if data is None:
                        rows.add(uri, "parquet", path, column, row, error="empty file")
                    elif len(data) > max_bytes:
                        rows.add(
                            uri, "parquet", path, column, row, error=_too_large(len(data)), size=len(data)
                        )
                    else:
                        rows.add(uri, "parquet", path, column, row, data=bytes(data))
                    row += 1
    except (OSError, ValueError, pa.ArrowException) as err:
        rows.add(path, "parquet", path, column, error=_unreadable(err))


def ingest_unit(unit: WorkUnit, max_pixels: int, max_bytes: int) -> pa.Table:
    """Read and probe every image of a work unit: one `images` row per image, good or bad."""
    rows = _Rows(unit.dataset, max_pixels)
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
