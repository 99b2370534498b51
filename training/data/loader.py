"""Training batches from lvd WebDataset shards, with a position that resumes exactly.

How the sample order is made (all of it a pure function of the seed and the layout):
- Streams: every (rank, DataLoader worker) pair reads its own stream; stream `s` of `S` takes the
  shards at positions s, s+S, s+2S, ... of an endless chain of seeded shard permutations (one
  permutation per pass over the dataset), so ranks and workers never read the same shard in a pass
  and every shard is read once per pass.
- Shuffle: a stream is cut into blocks of `shards_per_block` consecutive shards (about
  `shuffle_buffer` samples); the samples of a block are shuffled with a generator seeded by
  (seed, stream, block). This is a shuffle buffer that can be rebuilt: the position of a stream is
  (block, offset in the shuffled block), and restoring reads that block again and skips `offset`
  samples without decoding them.
- Epochs have a fixed length (`epoch_samples` over all ranks); the streams never restart, an epoch
  is just the next `len(loader)` batches. Batch i of an epoch comes from local stream i % num_workers
  (the DataLoader's round robin), so the position per stream plus the batch count in the epoch is the
  whole state.
- Decode failures are skipped and counted in `bad_samples`; they still advance the position.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import PIL.Image
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate
from webdataset.tariterators import group_by_keys, tar_file_expander

from lvd.curation.image_io import SHARD_IMAGE_EXTENSIONS
from lvd.embeddings.preprocess import decode_image as decode_bytes
from lvd.embeddings.preprocess import to_rgb
from lvd.schemas import layout

log = logging.getLogger("lvd")

IMAGE_EXTENSIONS = SHARD_IMAGE_EXTENSIONS
STATE_VERSION = 1


def resolve_shards(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern (`lvd-{000000..000009}.tar`), a shard folder, a version manifest
    (`index-v0002.json`), or a list of these.

    A folder is read through its `index.json` (written by the shard stage: the latest version's
    shards) when present, else every `lvd-*.tar` in it, sorted. A manifest names one version's shards,
    which lie beside it.
    """
    if isinstance(shards, os.PathLike):
        shards = os.fspath(shards)
    if not isinstance(shards, str):
        urls = [u for s in shards for u in resolve_shards(str(s))]
    elif os.path.isfile(shards) and shards.endswith(".json"):
        with open(shards) as f:
            names = [row["shard"] for row in json.load(f)["shards"]]
        urls = [os.path.join(os.path.dirname(shards), n) for n in names]
    elif os.path.isdir(shards):
        index = os.path.join(shards, layout.SHARD_INDEX_JSON)
        if os.path.exists(index):
            with open(index) as f:
                names = [row["shard"] for row in json.load(f)["shards"]]
        else:
            names = sorted(n for n in os.listdir(shards) if layout.is_shard_tar(n))
        urls = [os.path.join(shards, n) for n in names]
    else:
        urls = list(wds.shardlists.expand_urls(shards))
    if not urls:
        raise ValueError(f"no shards found in {shards!r}")
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}")
    return urls


def stream_shards(
    num_shards: int, seed: int, stream: int, num_streams: int, first: int, count: int
) -> list[int]:
    """Shard indices `first .. first+count-1` of one stream (see the module docstring)."""
    out = []
    perms: dict[int, np.ndarray] = {}
    for i in range(first, first + count):
        g = stream + i * num_streams
        p, j = divmod(g, num_shards)
        if p not in perms:
            perms[p] = np.random.default_rng([seed, p]).permutation(num_shards)
        out.append(int(perms[p][j]))
    return out


def read_shard(url: str) -> list[dict[str, Any]]:
    """The raw samples of one tar (dicts of extension -> bytes plus `__key__`, `__url__`).

    A damaged shard gives the samples before the damage and a warning, not a crash.
    """
    samples: list[dict[str, Any]] = []
    try:
        with fsspec.open(url, "rb") as f:
            files = tar_file_expander([{"url": url, "stream": f}])
            for sample in group_by_keys(files):
                samples.append(sample)
    except Exception as err:  # truncated / corrupt tar: keep what was read
        log.warning("shard %s: read stopped after %d samples: %s", url, len(samples), err)
    return samples


def read_block(
    urls: Sequence[str],
    seed: int,
    stream: int,
    num_streams: int,
    block: int,
    shards_per_block: int,
    shuffle: bool,
) -> list[dict[str, Any]]:
    """The samples of one block of a stream, shuffled deterministically."""
    indices = stream_shards(len(urls), seed, stream, num_streams, block * shards_per_block, shards_per_block)
    samples = [s for i in indices for s in read_shard(urls[i])]
    if shuffle:
        order = np.random.default_rng([seed, stream, block, 0x5EED]).permutation(len(samples))
        samples = [samples[i] for i in order]
    return samples


def decode_image(sample: dict[str, Any]) -> PIL.Image.Image:
    """The sample's image as RGB, decoded as the embed stage decodes it (first frame, EXIF orientation
    applied, 16-bit and float values scaled); raises if it has none or it does not decode."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return to_rgb(decode_bytes(sample[ext]))
    raise ValueError(f"sample {sample.get('__key__')} has no image member")


@dataclass(frozen=True)
class _Task:
    """What one DataLoader worker does in one epoch: `batches` batches from a stream, from a position."""

    stream: int  # local stream (0 .. num_workers-1)
    block: int
    offset: int
    batches: int


def _unwrap(item: Any) -> Any:
    # Batches are made inside the workers; the DataLoader only passes them through.
    return item


class _EpochDataset(IterableDataset):
    def __init__(self, loader: ShardLoader, tasks: list[_Task]):
        self.urls = loader.urls
        self.transform = loader.transform
        self.collate_fn = loader.collate_fn
        self.batch_size = loader.batch_size
        self.seed = loader.seed
        self.shards_per_block = loader.shards_per_block
        self.shuffle = loader.shuffle_buffer > 0
        self.num_streams = loader.world_size * max(1, loader.num_workers)
        self.rank_offset = loader.rank * max(1, loader.num_workers)
        self.tasks = tasks

    def __iter__(self) -> Iterator[tuple[Any, list[str], dict[str, int]]]:
        info = get_worker_info()
        task = self.tasks[info.id if info is not None else 0]
        block, offset = task.block, task.offset

        def load(block: int) -> list[dict[str, Any]]:
            stream = self.rank_offset + task.stream
            return read_block(
                self.urls, self.seed, stream, self.num_streams, block, self.shards_per_block, self.shuffle
            )

        samples = load(block) if task.batches else []
        # Blocks read since the last good sample: a whole pass without one means nothing is readable.
        blocks_without_good, max_blocks = 0, math.ceil(len(self.urls) / self.shards_per_block) + 1
        for _ in range(task.batches):
            items, keys, bad = [], [], 0
            while len(items) < self.batch_size:
                while offset >= len(samples):
                    blocks_without_good += 1
                    if blocks_without_good > max_blocks:
                        raise RuntimeError(
                            f"no decodable sample in a whole pass over {len(self.urls)} shard(s)"
                        )
                    block, offset = block + 1, 0
                    samples = load(block)
                sample = samples[offset]
                offset += 1
                try:
                    image = decode_image(sample)
                except Exception as err:  # any decoder error: skip and count, never stop training
                    bad += 1
                    log.debug("skipping undecodable sample %s: %s", sample.get("__key__"), err)
                    continue
                blocks_without_good = 0
                items.append(self.transform(image))
                keys.append(sample["__key__"])
            position = {"stream": task.stream, "block": block, "offset": offset, "bad": bad}
            yield self.collate_fn(items), keys, position


class ShardLoader:
    """Iterable of batches over WebDataset shards: one epoch (`len(self)` batches) per `iter()`.

    Each batch is `collate_fn([transform(image), ...])`, or `(keys, batch)` with `with_keys=True`.
    `state_dict()` is this rank's position after the last batch handed out; a loader built with
    `state=` continues exactly there (same shards, seed, batch size, ranks and workers required).
    The state is per rank: keep every rank's (e.g. all-gathered into the checkpoint) and give each
    rank its own back. Each `iter()` starts fresh DataLoader workers, which re-read their current
    block (at most ~shuffle_buffer samples, not decoded) to find their place.
    """

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[PIL.Image.Image], Any],
        batch_size: int,
        epoch_samples: int,
        seed: int,
        shuffle_buffer: int,
        num_workers: int,
        rank: int,
        world_size: int,
        collate_fn: Callable[[list[Any]], Any],
        shards_per_block: int,
        with_keys: bool,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1 or num_workers < 0 or shards_per_block < 1:
            raise ValueError("batch_size and shards_per_block must be >= 1, num_workers >= 0")
        self.urls = urls
        self.transform = transform
        self.batch_size = batch_size
        self.epoch_samples = epoch_samples
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.collate_fn = collate_fn
        self.shards_per_block = shards_per_block
        self.with_keys = with_keys
        self.batches_per_epoch = epoch_samples // (world_size * batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"epoch_samples={epoch_samples} gives no full batch of {batch_size} on each of {world_size} rank(s)"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self.positions = [(0, 0)] * max(1, num_workers)  # (block, offset) per local stream
        self.bad_samples = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _config(self) -> dict[str, Any]:
        return {
            "num_shards": len(self.urls),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "epoch_samples": self.epoch_samples,
            "shuffle_buffer": self.shuffle_buffer,
            "shards_per_block": self.shards_per_block,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "positions": [list(p) for p in self.positions],
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved, now = state["config"], self._config()
        differ = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"loader state does not match this loader ({detail})")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.positions = [(int(b), int(o)) for b, o in state["positions"]]
        self.bad_samples = int(state["bad_samples"])

    def _tasks(self) -> list[_Task]:
        # Batch i of the epoch belongs to local stream i % W; a restart mid-epoch rotates the
        # workers so the DataLoader's round robin starts at the stream that was due next.
        workers = max(1, self.num_workers)
        done = self.batch_in_epoch
        tasks = []
        for slot in range(workers):
            stream = (done + slot) % workers
            remaining = sum(1 for i in range(done, self.batches_per_epoch) if i % workers == stream)
            tasks.append(_Task(stream, *self.positions[stream], remaining))
        return tasks

    def __iter__(self) -> Iterator[Any]:
        dataset = _EpochDataset(self, self._tasks())
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_unwrap,
            prefetch_factor=2 if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),  # faster host-to-GPU copies when training on GPU
        )
        for batch, keys, position in loader:
            self.positions[position["stream"]] = (position["block"], position["offset"])
            self.bad_samples += position["bad"]
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            yield (keys, batch) if self.with_keys else batch


def _samples_per_shard(urls: list[str]) -> float:
    """Mean samples per shard from the dataset index beside the shards, else by counting the first shard."""
    index = (urls[0].rsplit("/", 1)[0] + "/" if "/" in urls[0] else "") + layout.SHARD_INDEX_JSON
    try:
        with fsspec.open(index, "r") as f:
            rows = json.load(f)["shards"]
        if rows:
            return sum(r["samples"] for r in rows) / len(rows)
    except (OSError, ValueError, KeyError):
        pass
    return max(1, len(read_shard(urls[0])))


def build_loader(
    shards: str | os.PathLike | list[str],
    transform: Callable[[PIL.Image.Image], Any],
    batch_size: int,
    *,
    epoch_samples: int,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable | None = None,
    state: dict | None = None,
    with_keys: bool = False,
) -> ShardLoader:
    """A resumable loader over WebDataset shards (brace pattern, shard folder or list).

    `epoch_samples` is the epoch length over all ranks (each rank yields
    epoch_samples // (world_size * batch_size) batches per epoch). `shuffle_buffer` is the
    approximate number of samples shuffled together (0: no shuffle, shards still in seeded order).
    `state` is a previous `ShardLoader.state_dict()` of the same rank. `with_keys=True` yields
    `(keys, batch)` instead of `batch` (the sample keys, for logging and tests).
    """
    urls = resolve_shards(shards)
    if shuffle_buffer > 0:
        shards_per_block = max(1, math.ceil(shuffle_buffer / _samples_per_shard(urls)))
    else:
        shards_per_block = 1
    if state is not None:
        # The block size is part of the order; keep the saved one even if the index changed.
        shards_per_block = int(state.get("config", {}).get("shards_per_block", shards_per_block))
    loader = ShardLoader(
        urls,
        transform,
        batch_size,
        epoch_samples,
        seed,
        shuffle_buffer,
        num_workers,
        rank,
        world_size,
        collate_fn or default_collate,
        shards_per_block,
        with_keys,
    )
    if state is not None:
        loader.load_state_dict(state)
    return loader


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """A PIL image as a float CHW tensor in [0, 1] (a minimal transform for tests and tools)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
