"""Finding images (folders, tar/WebDataset shards, parquet with bytes) and probing each one.

Plain functions; `jobs/stages/ingest.py` runs `ingest_unit` over many work units with Ray Data.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

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


def _matches(uri: str) -> list[_Match]:
    out = []
    for pattern in expand_braces(uri):
        fs, fs_path = fsspec.core.url_to_fs(pattern)
        if _has_glob(fs_path):
            out += [_Match(_canonical(fs, p), p, fs, False) for p in sorted(fs.glob(fs_path))]
        else:
            out.append(_Match(_canonical(fs, fs_path), fs_path, fs, True))
    return out


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


def check_sources(sources: list[Source], what: str = "source") -> None:
    """Fail before any work starts when a source cannot be right: matches nothing, a missing
    folder, a file of unknown kind, a parquet without the image column.

    Missing items of a brace pattern whose other items exist are not spec errors: they become
    `unreadable` rows so the rest of the data is still ingested.
    """
    for src in sources:
        matches = _matches(src.uri)
        existing = [m for m in matches if _exists(m)]
        if not existing:
            raise SourceError(f"{what} {src.uri!r}: no such file or folder (nothing matches)")
        if src.kind == "folder" and not any(m.fs.isdir(m.fs_path) for m in existing):
            raise SourceError(f"{what} {src.uri!r}: kind is 'folder' but it is not a folder")
        kinds = {m.path: _kind_of(m, src.kind) for m in existing}
        unknown = [m.path for m in existing if m.literal and kinds[m.path] is None]
        if unknown:
            raise SourceError(
                f"{what} {src.uri!r}: cannot tell what {unknown[0]!r} is (not a folder, .tar, .parquet "
                "or image); set kind: folder | tar | parquet"
            )
        parquets = [m for m in existing if kinds[m.path] == "parquet"]
        if parquets:
            first = parquets[0]
            with first.fs.open(first.fs_path, "rb") as f:
                names = pq.ParquetFile(f).schema_arrow.names
            if src.image_column not in names:
                raise SourceError(
                    f"{what} {src.uri!r}: {first.path} has no column {src.image_column!r} (columns: {names}); "
                    "set image_column"
                )


def _folder_files(match: _Match, every_file: bool) -> list[str]:
    entries = match.fs.find(match.fs_path, withdirs=False, detail=True)
    files = []
    for fs_path, info in entries.items():
        name = PurePosixPath(fs_path).name
        if name.startswith("."):
            continue
        is_file = info.get("type") == "file" or (info.get("islink") and info.get("type") != "directory")
        if is_file and (every_file or _ext(fs_path) in IMAGE_EXTENSIONS):
            files.append(_canonical(match.fs, fs_path))
    return sorted(files)


def _chunks(paths: list[str], size: int) -> Iterator[tuple[str, ...]]:
    for i in range(0, len(paths), size):
        yield tuple(paths[i : i + size])


def list_work_units(sources: list[Source], dataset: str, files_per_part: int) -> list[WorkUnit]:
    """Expand a dataset's sources into work units, in a deterministic order; no image is read.

    Each folder's files are chunked by `files_per_part`; loose image files (globs) are chunked
    together after the folders; each tar and parquet file is one unit. A path named by several
    sources is listed once (image ids must stay unique). A missing file named by a brace pattern
    still gets a unit, and so an `unreadable` row.
    """
    if files_per_part < 1:
        raise ValueError("files_per_part must be >= 1")
    seen: set[str] = set()
    units: list[WorkUnit] = []
    loose: list[str] = []

    def fresh(paths: list[str]) -> list[str]:
        new = [p for p in paths if p not in seen]
        seen.update(new)
        return new

    for src in sources:
        for match in _matches(src.uri):
            kind = _kind_of(match, src.kind) if _exists(match) else _missing_kind(match, src.kind)
            if kind == "folder":
                files = fresh(_folder_files(match, every_file=src.kind == "folder"))
                units += [WorkUnit(dataset, "files", chunk) for chunk in _chunks(files, files_per_part)]
            elif kind in ("tar", "parquet"):
                if fresh([match.path]):
                    units.append(WorkUnit(dataset, kind, (match.path,), src.image_column))
            elif kind == "file":
                loose += fresh([match.path])
    units += [WorkUnit(dataset, "files", chunk) for chunk in _chunks(sorted(loose), files_per_part)]
    return units


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
