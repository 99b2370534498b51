"""The training loader: exact resume, split by rank and worker, bad samples skipped and counted."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lvd.training.data import build_loader, resolve_shards
from lvd.training.data.loader import to_tensor

N_SHARDS = 6
PER_SHARD = 8
BAD_KEY = "s003_i005"


def _png(shard: int, i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (shard * 30, i * 20, 7)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """6 shards x 8 samples written with webdataset's own TarWriter; one sample does not decode."""
    d = tmp_path_factory.mktemp("loader")
    rows = []
    for s in range(N_SHARDS):
        name = f"lvd-{s:06d}.tar"
        with wds.TarWriter(str(d / name)) as tar:
            for i in range(PER_SHARD):
                key = f"s{s:03d}_i{i:03d}"
                image = b"not an image" if key == BAD_KEY else _png(s, i)
                tar.write({"__key__": key, "png": image, "json": json.dumps({"key": key}).encode()})
        rows.append({"shard": name, "samples": PER_SHARD, "bytes": 0, "sha256": ""})
    (d / "index.json").write_text(json.dumps({"shards": rows}))
    return d


ALL_KEYS = {f"s{s:03d}_i{i:03d}" for s in range(N_SHARDS) for i in range(PER_SHARD)} - {BAD_KEY}


def _keys(loader, batches: int | None = None) -> list[str]:
    out = []
    for keys, batch in loader:
        assert batch.shape == (len(keys), 3, 4, 6)
        out += keys
        if batches is not None and len(out) >= batches * len(keys):
            break
    return out


def test_shard_sources(shard_dir):
    pattern = str(shard_dir / "lvd-{000000..000005}.tar")
    assert (
        resolve_shards(shard_dir)
        == resolve_shards(pattern)
        == [str(shard_dir / f"lvd-{s:06d}.tar") for s in range(N_SHARDS)]
    )
    assert resolve_shards([pattern, str(shard_dir / "lvd-000000.tar")])[-1].endswith("lvd-000000.tar")
    (shard_dir / "empty").mkdir()
    with pytest.raises(ValueError, match="no shards"):
        resolve_shards(str(shard_dir / "empty"))
    with pytest.raises(FileNotFoundError, match="1 shard"):
        resolve_shards(str(shard_dir / "lvd-{000005..000006}.tar"))


def test_each_pass_reads_every_sample_once_and_counts_bad(shard_dir):
    # 2 passes of 48 raw samples; with 2 shards per block the blocks line up with the passes.
    loader = build_loader(str(shard_dir), to_tensor, 5, epoch_samples=47 * 2 // 5 * 5, shuffle_buffer=16,
                          seed=1, with_keys=True)  # fmt: skip
    keys = _keys(loader)
    assert len(keys) == 94 // 5 * 5 and loader.bad_samples == 2  # one bad sample per pass
    first, second = keys[:47], keys[47:]
    assert set(first) == ALL_KEYS and len(set(first)) == 47
    assert set(second) <= ALL_KEYS and len(set(second)) == len(second)
    assert first != sorted(first)  # shuffled


def test_ranks_and_workers_split_the_data(shard_dir):
    """2 ranks x 3 workers = 6 streams: one pass gives each stream one whole, different shard."""
    seen = []
    for rank in range(2):
        loader = build_loader(str(shard_dir), to_tensor, 4, epoch_samples=48, shuffle_buffer=0, num_workers=3,
                              rank=rank, world_size=2, seed=5, with_keys=True)  # fmt: skip
        keys = _keys(loader)
        # 48 samples / 2 ranks / batch 4 = 6 batches: 2 per worker = 8 samples, one shard each.
        # The worker reading shard 3 skips the bad sample and reads one from its next shard.
        shards = Counter(k[:4] for k in keys)
        assert len(keys) == 24 and sum(n >= 7 for n in shards.values()) == 3
        seen += keys
    # 48 samples cover all 47 good ones: the streams never read the same shard in a pass.
    assert len(seen) == 48 and ALL_KEYS <= set(seen)


@pytest.mark.parametrize("num_workers,world_size,rank", [(0, 1, 0), (2, 2, 1)])
def test_resume_continues_exactly(shard_dir, num_workers, world_size, rank):
    args = dict(epoch_samples=40 * world_size, shuffle_buffer=10, seed=3, num_workers=num_workers, rank=rank,
                world_size=world_size, with_keys=True)  # fmt: skip
    full = build_loader(str(shard_dir), to_tensor, 4, **args)
    reference = [k for _ in range(3) for k in _keys(full)]  # 3 epochs of 10 batches, uninterrupted
    assert len(reference) == 120

    run = build_loader(str(shard_dir), to_tensor, 4, **args)
    got = _keys(run)  # epoch 0
    got += _keys(run, batches=3)  # 3 batches into epoch 1, then "crash"
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 3
    resumed = build_loader(str(shard_dir), to_tensor, 4, state=state, **args)
    got += _keys(resumed)  # the rest of epoch 1
    got += _keys(resumed)  # epoch 2
    assert got == reference
    assert resumed.bad_samples == full.bad_samples


def test_state_from_another_setup_is_refused(shard_dir):
    loader = build_loader(str(shard_dir), to_tensor, 4, epoch_samples=16)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(str(shard_dir), to_tensor, 8, epoch_samples=16, state=state)


def test_default_collate_and_transform(shard_dir):
    loader = build_loader(str(shard_dir), lambda im: torch.tensor(np.asarray(im)[0, 0]), 3, epoch_samples=6)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert all(b.shape == (3, 3) and b.dtype == torch.uint8 for b in batches)
    # Pixel (0, 0) encodes the sample: red = 30 * shard, green = 20 * index.
    assert all(int(b[j, 0]) % 30 == 0 and int(b[j, 1]) % 20 == 0 for b in batches for j in range(3))
