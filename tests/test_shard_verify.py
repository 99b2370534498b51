"""`verify_shards` passes a good shard folder and names each kind of damage."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from lvd.jobs.shard_verify import verify_shards
from lvd.jobs.shard_writer import plan_shards, write_index, write_shard
from lvd.schemas.tables import CLUSTERS, CURATED, IMAGES


def build_shards(root: Path, n_images: int = 24, samples_per_shard: int = 6) -> Path:
    """A good shard folder written by the shard writer's own functions (no Spark needed)."""
    src = root / "src"
    src.mkdir(parents=True)
    images, curated = [], []
    for i in range(n_images):
        buf = io.BytesIO()
        pixels = np.random.default_rng(i).integers(0, 255, (10, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "PNG")
        path = src / f"{i}.png"
        path.write_bytes(buf.getvalue())
        images.append({"image_id": i, "dataset": "pool", "uri": str(path), "kind": "file", "path": str(path),
                       "member": None, "offset": None, "size": path.stat().st_size,
                       "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "width": 10, "height": 10,
                       "format": "png", "status": "ok", "error": None})  # fmt: skip
        curated.append({"image_id": i, "sources": ["balanced"], "repeats": 1})
    plan = plan_shards(
        pa.Table.from_pylist(curated, schema=CURATED),
        pa.Table.from_pylist(images, schema=IMAGES),
        CLUSTERS.empty_table(),
        samples_per_shard,
    )
    out = root / "shards"
    out.mkdir()
    rows = plan.to_pylist()
    n = max(r["shard"] for r in rows) + 1
    write_index(out, [write_shard(out, s, [r for r in rows if r["shard"] == s]) for s in range(n)])
    return out


@pytest.fixture
def good(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("verify"))


def _rewrite_tar(path: Path, edit) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = edit(members)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_good_folder_passes(good):
    assert verify_shards(good) == []
    assert len(list(good.glob("lvd-*.tar"))) == 4


def test_truncated_shard(good):
    path = good / "lvd-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    problems = verify_shards(good)
    assert any(p.startswith("lvd-000002.tar: ") and "bytes, index says" in p for p in problems)
    assert any("lvd-000002.tar: sha256" in p for p in problems)
    assert any(
        "lvd-000002.tar: " in p and ("does not read" in p or "samples, index says" in p) for p in problems
    )
    assert all(p.startswith("lvd-000002.tar") for p in problems)


def test_flipped_byte(good):
    path = good / "lvd-000001.tar"
    data = bytearray(path.read_bytes())
    # Flip a byte inside the first image's pixel data (after its 512-byte header and the PNG header).
    data[512 + 60] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_shards(good)
    assert "lvd-000001.tar: sha256 differs from the index" in problems
    assert any(p.startswith("lvd-000001.tar: sample") for p in problems)  # decode or image sha256


def test_missing_shard(good):
    (good / "lvd-000003.tar").unlink()
    assert verify_shards(good) == ["lvd-000003.tar: missing"]


def test_gap_in_names_and_unlisted_shard(good):
    index = json.loads((good / "index.json").read_text())
    shutil.copy(good / "lvd-000003.tar", good / "lvd-000007.tar")
    index["shards"][3]["shard"] = "lvd-000007.tar"
    (good / "index.json").write_text(json.dumps(index))
    problems = verify_shards(good)
    assert any("instead of lvd-000000.tar" in p for p in problems)
    assert "lvd-000003.tar: on disk but not in the index (of any version)" in problems
    assert "index.parquet and index.json list different shards" in problems


def test_duplicate_keys_adjacency_and_bad_json(good):
    first_key = {}

    def repeat_other_shard_key(members):
        members[0][0].name = first_key["name"]
        return members

    with tarfile.open(good / "lvd-000000.tar") as tar:
        first_key["name"] = tar.getmembers()[0].name
    _rewrite_tar(good / "lvd-000001.tar", repeat_other_shard_key)

    def split_a_sample(members):
        # Move the first sample's json to the end: its files are no longer adjacent.
        return (
            members[1:] + members[:1]
            if members[0][0].name.endswith(".json")
            else [members[0], *members[2:], members[1]]
        )

    _rewrite_tar(good / "lvd-000002.tar", split_a_sample)

    def break_json(members):
        m, _ = members[1]
        members[1] = (m, b"{not json")
        return members

    _rewrite_tar(good / "lvd-000003.tar", break_json)
    problems = verify_shards(good)
    key0 = first_key["name"].split(".")[0]
    assert f"lvd-000001.tar: key {key0} repeated (also in lvd-000000.tar)" in problems
    assert any(p.startswith("lvd-000002.tar: members of sample") and "not adjacent" in p for p in problems)
    assert any(p.startswith("lvd-000003.tar: sample") and "json does not parse" in p for p in problems)


def test_cli_exit_code(good):
    from lvd.jobs.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["shards", "verify", str(good)]).exit_code == 0
    (good / "lvd-000000.tar").unlink()
    result = runner.invoke(app, ["shards", "verify", str(good)])
    assert result.exit_code == 1
