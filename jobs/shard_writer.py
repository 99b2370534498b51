"""Planning and writing WebDataset shards (ARCHITECTURE.md, stage "shards"): plain functions, no Spark here.

- `plan_shards`: curated ⋈ images ⋈ clusters, repeats expanded, every sample given a shard and a
  position. Shards get the same number of samples (±1); clusters and seed sources are spread by
  sorting samples by (coarsest cluster, sources, finest cluster, seeded image order) and dealing
  that order round robin, so a run of c samples of one cluster puts at most ceil(c / shards) in any
  shard. The order inside a shard is a seeded shuffle. Keys start with shard and position, so
  "members sorted by key" is that shuffled order. This is the in-memory reference: the stage
  makes the same plan on Spark executors (`jobs.shard_plan`) with the pieces below that work on
  a part of the samples (`shards_needed`, `image_order_key`, `place_in_shards`, plan files).
- `write_shard`: one deterministic tar (fixed mtime/owner/mode, PAX format, image then json per
  key) with the ORIGINAL image bytes, written to a hidden temp name and renamed into place, then its
  parquet (SHARD_SAMPLES) whose metadata records the tar's size, sha256 and the plan digest: that
  parquet is what makes a shard "done" for a rerun.
- `write_index`: index.parquet + index.json (counts, sizes, sha256, brace pattern), written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.image_io import read_image_bytes
from lvd.curation.seeded import SHARD_ORDER, keyed_bits
from lvd.schemas import layout
from lvd.schemas.layout import shard_name, shard_table_name
from lvd.schemas.tables import (
    SHARD_INDEX,
    SHARD_SAMPLES,
    naming_error,
    write_json_atomic,
    write_parquet_atomic,
)

META_KEY = b"lvd.shard"  # per-shard parquet metadata: tar size, sha256, plan digest, errors
TAR_BLOCK = 512
TAR_RECORD = 10240
# PIL format name -> the file extension webdataset decoders and users expect.
EXTENSIONS = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}

PLAN = pa.schema(
    [
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("repeat", pa.int32(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("member", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("sources", pa.list_(pa.string()), nullable=False),
        pa.field("cluster_ids", pa.list_(pa.int32())),
    ]
)


class ShardPlanError(ValueError):
    """The curated table cannot be sharded (missing or failed images, duplicate ids)."""


def sample_keys(shard: pa.Array, position: pa.Array, image_id: pa.Array, repeat: pa.Array) -> pa.Array:
    """`{shard:06d}_{position:06d}_{image_id}_{repeat}`: unique across the dataset (shard and
    position are), no dots, < 128 characters, and sorting keys sorts samples in shard order."""

    def text(values: pa.Array, width: int = 0) -> pa.Array:
        out = pc.cast(values, pa.string())
        return pc.utf8_lpad(out, width, "0") if width else out

    return pc.binary_join_element_wise(text(shard, 6), text(position, 6), text(image_id), text(repeat), "_")


def image_extension(fmt: str) -> str:
    fmt = fmt.lower()
    return EXTENSIONS.get(fmt, fmt)


def tar_member_bytes(size: int | np.ndarray) -> int | np.ndarray:
    """Bytes a member of `size` bytes takes in a tar: one header block plus data padded to 512."""
    return TAR_BLOCK + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def tar_bytes(members_bytes: int) -> int:
    """Size of a tar whose members take `members_bytes`: two zero blocks, padded to a 10 KiB record."""
    return -(-(members_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


# A sidecar's bytes besides its uri: its fixed fields take ~300 bytes, the uri dominates the rest.
JSON_FIXED_BYTES = 400


def _json_estimate(uri_len: np.ndarray) -> np.ndarray:
    return tar_member_bytes(uri_len + JSON_FIXED_BYTES)


def _lookup(keys: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Row of each key in `table_ids` (unique ids), -1 where absent (Arrow joins reject list columns)."""
    if len(table_ids) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    order = np.argsort(table_ids, kind="stable")
    pos = np.clip(np.searchsorted(table_ids, keys, sorter=order), 0, len(table_ids) - 1)
    rows = order[pos]
    return np.where(table_ids[rows] == keys, rows, -1)


def expand_samples(curated: pa.Table, images: pa.Table, clusters: pa.Table) -> pa.Table:
    """One row per sample (an image repeated r times gives r rows), with source location and clusters."""
    curated = curated.sort_by("image_id")
    ids = curated["image_id"].to_numpy()
    repeats = curated["repeats"].to_numpy().astype(np.int64)
    if len(ids) and repeats.min() < 1:
        raise ShardPlanError("curated: repeats must be >= 1")
    if len(np.unique(ids)) != len(ids):
        raise ShardPlanError("curated: image_id repeated; use `repeats` instead")
    image_ids = images["image_id"].to_numpy()
    if len(np.unique(image_ids)) != len(image_ids):
        raise ShardPlanError("images: an image_id appears more than once")
    image_rows = _lookup(ids, image_ids)
    if (image_rows < 0).any():
        missing = ids[image_rows < 0]
        raise ShardPlanError(
            f"{len(missing)} curated image(s) not in the images table, e.g. {missing[:5].tolist()}"
        )
    found = images.take(pa.array(image_rows))
    failed = np.asarray(pc.not_equal(found["status"], "ok").to_numpy(zero_copy_only=False))
    if failed.any():
        raise ShardPlanError(
            f"{int(failed.sum())} curated image(s) failed ingest, e.g. {ids[failed][:5].tolist()}"
        )
    # Images without a cluster row (as_is seed images) get null cluster_ids.
    cluster_rows = _lookup(ids, clusters["image_id"].to_numpy())
    cluster_ids = clusters["cluster_ids"].combine_chunks().cast(pa.list_(pa.int32()))
    cluster_ids = cluster_ids.take(pa.array(cluster_rows, mask=cluster_rows < 0))
    joined = found.drop_columns(["image_id"]).append_column("image_id", curated["image_id"])
    joined = joined.append_column("sources", curated["sources"]).append_column("cluster_ids", cluster_ids)
    rows = np.repeat(np.arange(len(ids)), repeats)
    # The repeat index of each row: 0..r-1 within each image's run.
    repeat = np.arange(len(rows)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
    if len(rows) != len(ids):
        joined = joined.take(pa.array(rows, pa.int64()))
    return joined.append_column("repeat", pa.array(repeat, pa.int32()))


def count_shards(sample_bytes: np.ndarray, samples_per_shard: int, max_shard_bytes: int | None) -> int:
    """Shards needed for `samples_per_shard`, and for the byte target given the round-robin deal."""
    return shards_needed(
        len(sample_bytes),
        int(sample_bytes.sum()),
        samples_per_shard,
        max_shard_bytes,
        lambda n: max(int(sample_bytes[i::n].sum()) for i in range(n)),
    )


def shards_needed(
    n_samples: int,
    total_bytes: int,
    samples_per_shard: int,
    max_shard_bytes: int | None,
    largest_deal: Callable[[int], int],
) -> int:
    """`count_shards` for samples held elsewhere: `largest_deal(n)` is the largest byte sum over
    the n round-robin residues of the sample order (samples i, i + n, i + 2n, ... for each i < n)."""
    if n_samples == 0:
        return 0
    n = -(-n_samples // samples_per_shard)
    if max_shard_bytes is None:
        return n
    # More shards than samples would only add empty shards at the end of the deal.
    n = min(n_samples, max(n, -(-total_bytes // max_shard_bytes)))
    while n < n_samples:
        largest = tar_bytes(largest_deal(n))
        if largest <= max_shard_bytes:
            break
        n = min(n_samples, max(n + 1, int(n * largest / max_shard_bytes)))
    return n


def spread_order(coarse: np.ndarray, source: np.ndarray, fine: np.ndarray, image_id: np.ndarray,
                 repeat: np.ndarray, seed: int) -> np.ndarray:  # fmt: skip
    """Sample order whose round-robin deal spreads clusters and sources evenly.

    Samples of one (coarse cluster, sources) group are contiguous, so dealing them round robin
    gives every shard floor or ceil of the group's share; a seeded per-image key orders the group
    and keeps an image's repeats adjacent (so they land in different shards). The key is a pure
    function of the image id, so executors that each hold a slice of the samples agree on it.
    """
    image_key = keyed_bits(image_id, seed, SHARD_ORDER)
    return np.lexsort((repeat, image_id, image_key, fine, source, coarse))


def plan_shards(
    curated: pa.Table,
    images: pa.Table,
    clusters: pa.Table,
    samples_per_shard: int,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    exclude: pa.Table | None = None,
    first: int = 0,
) -> pa.Table:
    """The PLAN table: every sample with its shard, position and key, sorted by (shard, position).

    `exclude`: (image_id, repeat) rows of samples left out (those of an earlier version's kept
    shards); the others are dealt into shards numbered from `first`."""
    samples = expand_samples(curated, images, clusters)
    # Sample sets are grouped by their names as listed (the sample stage lists them sorted), numbered
    # before any sample is left out, as the Spark plan numbers them over the whole curated table.
    source = pc.binary_join(samples["sources"], "|").combine_chunks().dictionary_encode().indices
    if exclude is not None and exclude.num_rows and samples.num_rows:
        left = ~sample_in(samples["image_id"].to_numpy(), samples["repeat"].to_numpy(), exclude)
        samples, source = samples.filter(pa.array(left)), source.filter(pa.array(left))
    n_samples = samples.num_rows
    if n_samples == 0:
        return PLAN.empty_table()
    coarse, fine = _cluster_levels(samples["cluster_ids"].combine_chunks())
    image_id = samples["image_id"].to_numpy()
    repeat = samples["repeat"].to_numpy()
    sizes = samples["size"].to_numpy()
    uri_len = pc.binary_length(samples["uri"]).to_numpy().astype(np.int64)

    order = spread_order(coarse, source.to_numpy(), fine, image_id, repeat, seed)
    sample_bytes = (tar_member_bytes(sizes) + _json_estimate(uri_len))[order]
    n_shards = count_shards(sample_bytes, samples_per_shard, max_shard_bytes)

    shard = np.empty(n_samples, dtype=np.int32)
    position = np.empty(n_samples, dtype=np.int32)
    for s in range(n_shards):
        members = order[s::n_shards]
        shard[members] = first + s
        position[members] = shard_positions(seed, first + s, len(members))
    final = np.lexsort((position, shard))
    plan = samples.take(pa.array(final))
    shard, position = pa.array(shard[final]), pa.array(position[final])
    plan = plan.append_column("shard", shard).append_column("position", position)
    plan = plan.append_column("key", sample_keys(shard, position, plan["image_id"], plan["repeat"]))
    return plan.select(PLAN.names).cast(PLAN)


def sample_in(image_id: np.ndarray, repeat: np.ndarray, samples: pa.Table) -> np.ndarray:
    """Which of the samples (image_id, repeat) are among the (image_id, repeat) rows of `samples`."""
    pair = pa.schema([("image_id", pa.int64()), ("repeat", pa.int64())])
    mine = pa.table({"image_id": image_id, "repeat": repeat}).cast(pair)
    mine = mine.append_column("row", pa.array(np.arange(mine.num_rows, dtype=np.int64)))
    theirs = samples.select(["image_id", "repeat"]).cast(pair)
    rows = mine.join(theirs, ["image_id", "repeat"], join_type="left semi")["row"].to_numpy()
    found = np.zeros(mine.num_rows, dtype=bool)
    found[rows] = True
    return found


# What a sample's tar member and sidecar are made of besides its image id and repeat: a kept shard's
# samples must all be unchanged in these.
SAME_COLUMNS = ["uri", "sha256", "format", "sources", "cluster_ids"]


def key_repeat(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The repeat of each sample key (`sample_keys`: its last field)."""
    return pc.cast(pc.replace_substring_regex(keys, r"^.*_", ""), pa.int64())


def _content_text(t: pa.Table) -> pa.Array:
    """SAME_COLUMNS of each row as one string (lists joined, a null list as its own text)."""
    sources = pc.binary_join(t["sources"], "|")
    clusters = pc.binary_join(t["cluster_ids"].cast(pa.list_(pa.string())), ",")
    parts = [t["uri"], t["sha256"], t["format"], sources, pc.fill_null(clusters, "null")]
    return pc.binary_join_element_wise(*parts, "\x1f").combine_chunks()


def unchanged_samples_per_shard(earlier: pa.Table, samples: pa.Table) -> dict[int, int]:
    """Which earlier shards would hold exactly the same samples now (`unchanged_shards`'s answer,
    for tables in memory): `earlier` holds SHARD_SAMPLES rows of earlier shards, `samples` today's
    samples (`expand_samples`). Returns {shard number: samples} of the shards whose every sample is
    still a sample (same image, repeat) with the same bytes, uri, format, sources and clusters."""
    if earlier.num_rows == 0:
        return {}
    repeat = key_repeat(earlier["key"])
    number = np.array([layout.shard_number(n) for n in earlier["shard"].to_pylist()], dtype=np.int64)
    pair = pa.schema([("image_id", pa.int64()), ("repeat", pa.int64()), ("text", pa.string())])
    before = pa.table([earlier["image_id"], repeat, _content_text(earlier)], schema=pair)
    before = before.append_column("row", pa.array(np.arange(before.num_rows, dtype=np.int64)))
    now = pa.table(
        [samples["image_id"], samples["repeat"].cast(pa.int64()), _content_text(samples)], schema=pair
    )
    same_rows = before.join(now, ["image_id", "repeat", "text"], join_type="left semi")["row"].to_numpy()
    same = np.zeros(before.num_rows, dtype=bool)
    same[same_rows] = True
    shards, total = np.unique(number, return_counts=True)
    unchanged = np.bincount(np.searchsorted(shards, number[same]), minlength=shards.size)
    return {int(n): int(c) for n, c, u in zip(shards, total, unchanged, strict=True) if c == u}


def shard_positions(seed: int, shard: int, n_members: int) -> np.ndarray:
    """The position in shard `shard` of each of its members, members in deal order: a seeded shuffle."""
    return np.random.default_rng([seed, 2, shard]).permutation(n_members)


def image_order_key(image_id: np.ndarray, seed: int) -> np.ndarray:
    """`spread_order`'s seeded per-image key as an int64 that sorts like the uint64 (top bit
    flipped), for engines without unsigned integers (Spark)."""
    return (keyed_bits(image_id, seed, SHARD_ORDER) ^ np.uint64(1 << 63)).view(np.int64)


def place_in_shards(samples: pa.Table, seed: int) -> pa.Table:
    """PLAN rows of whole shards, sorted by (shard, position), from samples that know their shard
    and `deal_rank`, their index among the shard's members in deal order (as `plan_shards` deals).

    What one executor does for the shards it holds: each shard's positions are its seeded shuffle.
    """
    if samples.num_rows == 0:
        return PLAN.empty_table()
    shard = samples["shard"].to_numpy()
    rank = samples["deal_rank"].to_numpy()
    by_rank = np.lexsort((rank, shard))
    shard, rank = shard[by_rank], rank[by_rank]
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
    ends = np.r_[starts[1:], len(shard)]
    position = np.empty(len(shard), dtype=np.int32)
    for start, end in zip(starts, ends, strict=True):
        if not np.array_equal(rank[start:end], np.arange(end - start)):
            raise ValueError(f"shard {shard[start]}: members are not ranks 0 .. {end - start - 1}")
        position[start:end] = shard_positions(seed, int(shard[start]), int(end - start))
    by_position = np.lexsort((position, shard))
    plan = samples.take(pa.array(by_rank[by_position]))
    shard, position = pa.array(shard[by_position], pa.int32()), pa.array(position[by_position])
    plan = plan.drop_columns(["shard"]).append_column("shard", shard).append_column("position", position)
    plan = plan.append_column("key", sample_keys(shard, position, plan["image_id"], plan["repeat"]))
    return plan.select(PLAN.names).cast(PLAN)


def write_plan_file(plan: pa.Table, path: str | Path) -> None:
    """PLAN rows of consecutive whole shards, sorted by (shard, position), as parquet with row
    group i = the file's i-th shard, so that a shard's task reads only its own rows."""
    path = Path(path)
    shards = plan["shard"].to_numpy()
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(shards) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(shards)].astype(int)
    first = shards[0] if len(shards) else 0
    if not np.array_equal(shards[starts], np.arange(first, first + len(starts))):
        raise ValueError(f"{path.name}: shards of a plan file must be consecutive and sorted")
    tmp = layout.temp_path(path)
    try:
        with pq.ParquetWriter(tmp, PLAN) as writer:
            for start, end in zip(starts, ends, strict=True):
                writer.write_table(plan.slice(start, end - start), row_group_size=1 << 30)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_plan_rows(path: str, row_group: int) -> list[dict[str, Any]]:
    """One shard's plan rows: row group `row_group` of a plan file written by `write_plan_file`."""
    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).read_row_group(row_group).to_pylist()


def _cluster_levels(cluster_ids: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(coarsest, finest) cluster of each sample, -1 where it has none (as_is seed images)."""
    lengths = pc.fill_null(pc.list_value_length(cluster_ids), 0).to_numpy()
    # `offsets` index into `values` (the whole child array, also for a sliced list array).
    starts = cluster_ids.offsets.to_numpy()[:-1]
    values = cluster_ids.values.to_numpy(zero_copy_only=False).astype(np.int64)
    has = lengths > 0
    fine = np.full(len(lengths), -1, dtype=np.int64)
    coarse = np.full(len(lengths), -1, dtype=np.int64)
    fine[has] = values[starts[has]]
    coarse[has] = values[starts[has] + lengths[has] - 1]
    return coarse, fine


def plan_digest(rows: list[dict[str, Any]]) -> str:
    """What a shard's content depends on: its keys, the image hashes and the provenance, in order."""
    h = hashlib.sha256()
    for r in rows:
        h.update(sample_json(r))
        h.update(b"\0")
    return h.hexdigest()


def sample_json(row: dict[str, Any]) -> bytes:
    """The provenance sidecar of one sample (stable bytes: sorted keys, no whitespace)."""
    doc = {
        "key": row["key"],
        "image_id": str(row["image_id"]),  # a string: JSON readers parse numbers as float64 (schemas/ids.py)
        "repeat": row["repeat"],
        "dataset": row.get("dataset"),
        "uri": row["uri"],
        "sha256": row["sha256"],
        "format": row["format"],
        "sources": list(row["sources"]),
        "cluster_ids": None if row["cluster_ids"] is None else list(row["cluster_ids"]),
        "shard": shard_name(row["shard"]),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _tarfile_header(name: str, size: int) -> bytes:
    """The header block(s) tarfile writes for this member in PAX format (the reference)."""
    return _tar_info(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


# tarfile's header for an empty name and size 0, with the checksum field blank (8 spaces): members
# with a short ASCII name differ from it only in the name, size and checksum fields.
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
_TEMPLATE = bytearray(_tarfile_header("", 0))
_TEMPLATE[_CHKSUM] = b" " * 8
_TEMPLATE_SUM = (
    sum(_TEMPLATE[: _NAME.start]) + sum(_TEMPLATE[_NAME.stop : _SIZE.start]) + sum(_TEMPLATE[_SIZE.stop :])
)
_MAX_USTAR_SIZE = 8**11 - 1


def member_header(name: str, size: int) -> bytes:
    """The header block(s) of a tar member, byte-identical to `_tarfile_header` (tests check it).

    Headers are built by patching a template: tarfile's own header code costs as much per member as
    copying a photo, and a shard has hundreds of thousands of members. Names that need a PAX
    extended header (long or non-ASCII) and huge sizes go through tarfile.
    """
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not raw or len(raw) > 100 or size > _MAX_USTAR_SIZE or size < 0:
        return _tarfile_header(name, size)
    header = bytearray(_TEMPLATE)
    header[: len(raw)] = raw
    size_field = b"%011o\0" % size
    header[_SIZE] = size_field
    chksum = _TEMPLATE_SUM + sum(raw) + sum(size_field)
    header[_CHKSUM] = b"%06o\0 " % chksum
    return bytes(header)


# Test hook (tests/test_faults.py): when set to a file path that does not exist yet, the process
# writing a tar creates that file (holding the tar's temp path) and kills itself after the tar's
# first member, so a Spark task dies mid-write exactly once per marker file.
DIE_WRITING_TAR_ENV = "LVD_TEST_DIE_WRITING_TAR"


def _die_once_for_test(tmp: Path) -> None:
    marker = os.environ.get(DIE_WRITING_TAR_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(tmp).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


_ZEROS = bytes(TAR_RECORD)
# Buffers are handed to the kernel in batches of about this many bytes (one writev each); batches
# of a few images keep syscalls few without copying image bytes into a buffer.
_BATCH_BYTES = 1 << 20
_BATCH_BUFFERS = 512  # well under IOV_MAX
# Every this many bytes the kernel is asked to start writing the tar back to disk, so the disk
# works while the next images are read and hashed and the final fsync has little left to do.
_WRITEBACK_BYTES = 8 << 20


class _TarFile:
    """An open tar temp file: batched unbuffered writes, a running sha256, early writeback."""

    def __init__(self, fd: int):
        self.fd, self.sha, self.size = fd, hashlib.sha256(), 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.written_back = 0

    def add(self, buffer: bytes) -> None:
        if not buffer:
            return
        self.sha.update(buffer)
        self.pending.append(buffer)
        self.pending_bytes += len(buffer)
        if self.pending_bytes >= _BATCH_BYTES or len(self.pending) >= _BATCH_BUFFERS:
            self.flush()

    def add_member(self, name: str, data: bytes) -> None:
        self.add(member_header(name, len(data)))
        self.add(data)
        self.add(_ZEROS[: -len(data) % TAR_BLOCK])

    def flush(self) -> None:
        views = [memoryview(b) for b in self.pending]
        while views:
            n = os.writev(self.fd, views)
            if n == 0:
                raise OSError(f"no progress writing a tar ({self.size} bytes written)")
            self.size += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if views:
                views[0] = views[0][n:]
        self.pending, self.pending_bytes = [], 0
        if self.size - self.written_back >= _WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            # POSIX_FADV_DONTNEED starts asynchronous writeback of the dirty range on Linux.
            os.posix_fadvise(
                self.fd, self.written_back, self.size - self.written_back, os.POSIX_FADV_DONTNEED
            )
            self.written_back = self.size

    def finish(self) -> None:
        """The end-of-archive blocks and record padding, as tarfile writes them on close."""
        end = self.size + self.pending_bytes + 2 * TAR_BLOCK
        self.add(_ZEROS[: 2 * TAR_BLOCK])
        self.add(_ZEROS[: -end % TAR_RECORD])
        self.flush()


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> tuple[int, str]:
    """Write `members` as a deterministic tar at `path` (temp then rename); returns (bytes, sha256).

    The bytes are those tarfile writes in PAX format for the same members (fixed mtime, owner,
    mode): headers, data padded to 512, two zero blocks, padding to a 10 KiB record.
    """
    tmp = layout.temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            tar = _TarFile(fd)
            for i, (name, data) in enumerate(members):
                tar.add_member(name, data)
                if i == 0 and os.environ.get(DIE_WRITING_TAR_ENV):
                    tar.flush()
                    _die_once_for_test(tmp)
            tar.finish()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        raise naming_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)
    return tar.size, tar.sha.hexdigest()


class _RowGroupCache:
    """Image columns of parquet row groups this process read lately, least recently used dropped
    first, keyed by the file's path, size and mtime so a rewritten file is never served stale.

    The plan spreads a row group's images over many shards, so without it every shard that draws
    from a row group reads and decodes all of it again; Spark reuses a Python worker for the
    shards it writes one after another, and they hit here instead.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple, pa.ChunkedArray] = OrderedDict()

    def get(self, key: tuple) -> pa.ChunkedArray | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: tuple, values: pa.ChunkedArray) -> None:
        if values.nbytes > self.max_bytes:
            return
        while self.entries and self.bytes + values.nbytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1].nbytes
        self.entries[key] = values
        self.bytes += values.nbytes


ROW_GROUP_CACHE = _RowGroupCache(256 << 20)


def read_parquet_rows(path: str, column: str, rows: Iterable[int]) -> dict[int, bytes]:
    """Image bytes of several rows of one parquet file, reading each needed row group once.

    (Reading rows one by one would decode a whole row group per image.) Row groups of local files
    are kept in `ROW_GROUP_CACHE` for the next shards.
    """
    wanted = sorted(set(rows))
    out: dict[int, bytes] = {}
    local = _local_path(path)
    stat = os.stat(local) if local is not None else None
    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        groups = np.searchsorted(starts, wanted, side="right") - 1
        for group in np.unique(groups[(groups >= 0) & (groups < len(sizes))]):
            key = None if stat is None else (local, stat.st_size, stat.st_mtime_ns, int(group), column)
            values = None if key is None else ROW_GROUP_CACHE.get(key)
            if values is None:
                values = pf.read_row_group(int(group), columns=[column]).column(0)
                if key is not None:
                    ROW_GROUP_CACHE.put(key, values)
            for row, g in zip(wanted, groups, strict=True):
                if g == group:
                    value = values[row - int(starts[group])].as_py()
                    out[row] = value["bytes"] if isinstance(value, dict) else value
    return out


def _local_path(path: str) -> str | None:
    """`path` as a local file path, or None for other filesystems (read through fsspec)."""
    if "://" not in path:
        return path
    return path[len("file://") :] if path.startswith("file://") else None


class _LocalSources:
    """Reads of files and tar members on local disk with plain file objects, a tar's kept open
    for the whole shard (fsspec's per-open cost is larger than reading a small image)."""

    def __init__(self) -> None:
        self.open_tars: dict[str, Any] = {}

    def read(self, kind: str, path: str, member: str | None, offset: int | None, size: int | None) -> bytes:
        local = _local_path(path)
        if local is None or kind not in ("file", "tar"):
            return read_image_bytes(kind, path, member, offset, size)
        if kind == "file":
            with open(local, "rb") as f:
                return f.read()
        if offset is None or size is None:
            raise ValueError(f"tar member {path}#{member} has no offset/size")
        f = self.open_tars.get(local)
        if f is None:
            f = self.open_tars[local] = open(local, "rb")  # noqa: SIM115 (closed in close())
        data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"short read from {path}#{member}: {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        for f in self.open_tars.values():
            f.close()
        self.open_tars.clear()


def read_sources(
    rows: list[dict[str, Any]], read: Callable[..., bytes] | None = None
) -> Iterator[tuple[dict[str, Any], bytes | Exception]]:
    """Each row's original image bytes (checked against the sha256 ingest recorded) or the error, in order.

    `read(kind, path, member, offset, size)` reads a file or tar member; by default local files are
    read directly and anything else through `read_image_bytes`.
    """
    local = _LocalSources() if read is None else None
    read = local.read if local is not None else read
    parquet: dict[tuple[str, str], dict[int, bytes] | Exception] = {}
    for key in {(r["path"], r["member"]) for r in rows if r["kind"] == "parquet"}:
        try:
            wanted = (r["offset"] for r in rows if r["kind"] == "parquet" and (r["path"], r["member"]) == key)
            parquet[key] = read_parquet_rows(key[0], key[1], wanted)
        except Exception as err:  # unreadable file: every row from it fails with this reason
            parquet[key] = err
    try:
        for r in rows:
            try:
                if r["kind"] == "parquet":
                    found = parquet[(r["path"], r["member"])]
                    if isinstance(found, Exception):
                        raise found
                    if r["offset"] not in found:
                        raise IndexError(f"row {r['offset']} out of range in {r['path']}")
                    data = found[r["offset"]]
                else:
                    data = read(r["kind"], r["path"], r["member"], r["offset"], r["size"])
                digest = hashlib.sha256(data).hexdigest()
                if digest != r["sha256"]:
                    raise ValueError(
                        f"content changed since ingest (sha256 {digest[:12]} != {r['sha256'][:12]})"
                    )
            except Exception as err:  # any read failure is reported per image, never stops the shard
                yield r, err
                continue
            yield r, data
    finally:
        if local is not None:
            local.close()


def write_shard(out_dir: str | Path, shard: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write shard `shard` from its plan rows: the tar, then its parquet. Returns the index row + errors.

    An image that cannot be read (or whose bytes changed since ingest) is left out and reported in
    `errors`; the shard keeps every other sample.
    """
    out_dir = Path(out_dir)
    rows = sorted(rows, key=lambda r: r["key"])
    if any(r["shard"] != shard for r in rows):
        raise ValueError(f"rows of another shard given to shard {shard}")
    digest = plan_digest(rows)
    tar_path, table_path = out_dir / shard_name(shard), out_dir / shard_table_name(shard)
    # The old parquet goes first: a new tar beside a stale parquet must never look finished.
    table_path.unlink(missing_ok=True)
    written: list[dict[str, Any]] = []
    errors: list[list[str]] = []

    def members() -> Iterable[tuple[str, bytes]]:
        for r, data in read_sources(rows):
            if isinstance(data, Exception):
                errors.append([r["key"], r["uri"], f"{type(data).__name__}: {data}"])
                continue
            written.append(r)
            yield f"{r['key']}.{image_extension(r['format'])}", data
            yield f"{r['key']}.json", sample_json(r)

    size, sha = write_tar(tar_path, members())
    result = {"shard": shard_name(shard), "samples": len(written), "bytes": size, "sha256": sha}
    meta = {**result, "digest": digest, "errors": errors}
    table = pa.Table.from_pylist(
        [{name: r[name] for name in SHARD_SAMPLES.names if name != "shard"} | {"shard": result["shard"]}
         for r in written],
        schema=SHARD_SAMPLES,
    )  # fmt: skip
    write_parquet_atomic(table, table_path, SHARD_SAMPLES.with_metadata({META_KEY: json.dumps(meta)}))
    return meta


def finished_shard(out_dir: str | Path, shard: int, digest: str) -> dict[str, Any] | None:
    """The recorded result of a shard written for the same plan rows and still whole, else None."""
    out_dir = Path(out_dir)
    try:
        metadata = pq.read_schema(out_dir / shard_table_name(shard)).metadata or {}
        meta = json.loads(metadata[META_KEY])
        size = (out_dir / shard_name(shard)).stat().st_size
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None
    if meta.get("digest") != digest or meta.get("bytes") != size:
        return None
    return meta


def remove_temps(out_dir: str | Path) -> None:
    """Drop temp files: those of task attempts that died mid-write (their retries wrote the shard)."""
    for p in Path(out_dir).iterdir():
        if layout.is_temp(p.name):
            p.unlink(missing_ok=True)


def remove_stale(out_dir: str | Path, n_shards: int) -> None:
    """Drop temp files of a killed run, shards beyond this plan's count, and the old index."""
    out_dir = Path(out_dir)
    for p in out_dir.iterdir():
        number = layout.shard_number(p.name)
        if layout.is_temp(p.name) or (number is not None and number >= n_shards):
            p.unlink(missing_ok=True)
    for name in (layout.SHARD_INDEX_JSON, layout.SHARD_INDEX_PARQUET):
        (out_dir / name).unlink(missing_ok=True)


def write_index(out_dir: str | Path, results: list[dict[str, Any]]) -> dict[str, Any]:
    """index.parquet (SHARD_INDEX) and index.json (same rows, totals, brace pattern), written last."""
    out_dir = Path(out_dir)
    rows = sorted(({k: r[k] for k in SHARD_INDEX.names} for r in results), key=lambda r: r["shard"])
    expected = [shard_name(i) for i in range(len(rows))]
    if [r["shard"] for r in rows] != expected:
        raise ValueError(f"shard results are not {shard_name(0)} .. without gaps")
    total = {
        "shards": len(rows),
        "samples": sum(r["samples"] for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
    }
    write_parquet_atomic(
        pa.Table.from_pylist(rows, schema=SHARD_INDEX), out_dir / layout.SHARD_INDEX_PARQUET, SHARD_INDEX
    )
    doc = {"shards": rows, "total": total, "pattern": layout.shard_pattern(len(rows))}
    write_json_atomic(out_dir / layout.SHARD_INDEX_JSON, doc)
    return doc
