"""`lvd shards verify DIR`: check a shard folder written by the shard stage, listing every problem.

Checks: the index (index.json; index.parquet agrees), shard names without gaps (a later version of
the output skips the numbers of earlier versions' shards) and none missing or unlisted, each tar's
size and sha256 against the index, that each tar reads to the end, sample counts against the index
and the shard's parquet, key rules (unique across the dataset, no dots, no '/', under 128
characters), all members of a sample adjacent, exactly one image and one json per sample, every
image decodes, every json parses and names its key and its image's sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from lvd.curation.image_io import SHARD_IMAGE_EXTENSIONS
from lvd.schemas import layout
from lvd.schemas.tables import file_sha256

IMAGE_EXTENSIONS = set(SHARD_IMAGE_EXTENSIONS)
MAX_KEY = 128


def _check_sample(shard: str, key: str, files: dict[str, bytes]) -> list[str]:
    problems = []
    images = [ext for ext in files if ext in IMAGE_EXTENSIONS]
    others = sorted(set(files) - set(images) - {"json"})
    if len(images) != 1 or "json" not in files or others:
        problems.append(f"{shard}: sample {key} has members {sorted(files)}, expected one image and one json")
    meta: dict[str, Any] | None = None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as err:
            problems.append(f"{shard}: sample {key}: json does not parse: {err}")
    for ext in images:
        data = files[ext]
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as err:  # every decoder error counts as a problem, whatever its type
            problems.append(f"{shard}: sample {key}: {ext} does not decode: {type(err).__name__}: {err}")
        if isinstance(meta, dict) and meta.get("sha256") != hashlib.sha256(data).hexdigest():
            problems.append(f"{shard}: sample {key}: image sha256 differs from its json")
    if isinstance(meta, dict) and meta.get("key") != key:
        problems.append(f"{shard}: sample {key}: json names key {meta.get('key')!r}")
    if isinstance(meta, dict) and meta.get("shard", shard) != shard:
        problems.append(f"{shard}: sample {key}: json names shard {meta.get('shard')!r}")
    return problems


def _check_key(shard: str, key: str) -> list[str]:
    if not key or "/" in key or len(key) >= MAX_KEY:
        return [f"{shard}: bad key {key!r} (needs 1..{MAX_KEY - 1} characters, no '/')"]
    return []


def verify_tar(path: Path, seen_keys: dict[str, str]) -> tuple[list[str], list[str]]:
    """Problems in one tar and its keys in order; `seen_keys` (key -> shard) spans the dataset."""
    shard = path.name
    problems: list[str] = []
    keys: list[str] = []
    current: str | None = None
    files: dict[str, bytes] = {}
    closed: set[str] = set()

    def finish() -> None:
        if current is not None:
            problems.extend(_check_sample(shard, current, files))

    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    problems.append(f"{shard}: member {member.name!r} is not a regular file")
                    continue
                key, dot, ext = member.name.partition(".")
                if not dot:
                    problems.append(f"{shard}: member {member.name!r} has no extension")
                    continue
                if "." in ext and ext.split(".")[-1] in IMAGE_EXTENSIONS | {"json"}:
                    problems.append(f"{shard}: member {member.name!r}: key contains a dot")
                data = tar.extractfile(member).read()
                if key != current:
                    finish()
                    if key in closed:
                        problems.append(f"{shard}: members of sample {key} are not adjacent")
                    elif key in seen_keys:
                        problems.append(f"{shard}: key {key} repeated (also in {seen_keys[key]})")
                    else:
                        problems.extend(_check_key(shard, key))
                        keys.append(key)
                    if current is not None:
                        closed.add(current)
                    seen_keys.setdefault(key, shard)
                    current, files = key, {}
                if ext in files:
                    problems.append(f"{shard}: sample {key} has two {ext} members")
                files[ext] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{shard}: tar does not read to the end: {type(err).__name__}: {err}")
    finish()
    return problems, keys


def _read_index(directory: Path) -> tuple[list[dict[str, Any]] | None, list[str]]:
    try:
        doc = json.loads((directory / layout.SHARD_INDEX_JSON).read_text())
        rows = doc["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, [f"index.json missing or unreadable: {err}"]
    problems = []
    total = doc.get("total", {})
    want = {
        "shards": len(rows),
        "samples": sum(r["samples"] for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
    }
    if total != want:
        problems.append(f"index.json: total {total} does not add up to its rows {want}")
    try:
        if pq.read_table(directory / layout.SHARD_INDEX_PARQUET).to_pylist() != rows:
            problems.append("index.parquet and index.json list different shards")
    except OSError as err:
        problems.append(f"index.parquet missing or unreadable: {err}")
    return rows, problems


def verify_shards(directory: str | Path) -> list[str]:
    """Every problem found in a shard folder (empty list: the folder is good)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    rows, problems = _read_index(directory)
    if rows is None:
        return problems
    listed = [r["shard"] for r in rows]
    versions = layout.list_shard_versions(directory)
    named = set(listed)
    if len(versions) > 1:  # later versions keep some shards and number new ones after all earlier ones
        if listed != sorted(named) or not all(layout.is_shard_tar(n) for n in listed):
            problems.append(f"index lists {listed[:3]}...: not distinct shard names in order")
        named |= {row["shard"] for v in versions for row in json.loads(v.read_text())["shards"]}
    elif listed != [layout.shard_name(i) for i in range(len(rows))]:
        problems.append(
            f"index lists {listed[:3]}... instead of {layout.shard_name(0)} .. {layout.shard_name(len(rows) - 1)}"
        )
    on_disk = sorted(p.name for p in directory.glob("*.tar") if layout.is_shard_tar(p.name))
    for name in sorted(set(on_disk) - named):
        problems.append(f"{name}: on disk but not in the index (of any version)")
    seen_keys: dict[str, str] = {}
    for row in rows:
        name = row["shard"]
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != row["bytes"]:
            problems.append(f"{name}: {size} bytes, index says {row['bytes']}")
        if file_sha256(path) != row["sha256"]:
            problems.append(f"{name}: sha256 differs from the index")
        tar_problems, keys = verify_tar(path, seen_keys)
        problems.extend(tar_problems)
        if len(keys) != row["samples"]:
            problems.append(f"{name}: {len(keys)} samples, index says {row['samples']}")
        try:
            table_keys = pq.read_table(path.with_suffix(".parquet"), columns=["key"])["key"].to_pylist()
            if table_keys != keys:
                problems.append(
                    f"{name}: its parquet lists {len(table_keys)} keys that differ from the tar's"
                )
        except OSError as err:
            problems.append(f"{name}: parquet missing or unreadable: {err}")
    return problems
