"""The Ray embed stage on a handful of images: both models in one pass, failures recorded, resume by part."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import lvd.jobs.stages.embed as embed
from lvd.curation.stage_io import load_vectors
from lvd.embeddings.models import load_embedding_model
from lvd.embeddings.preprocess import preprocess_image
from lvd.embeddings.store import read_embeddings
from lvd.jobs.stage import StageContext
from lvd.schemas import layout
from lvd.schemas.job_spec import parse_job_spec
from lvd.schemas.tables import IMAGES, embeddings_schema, write_parquet_atomic

RETRIEVAL = {"arch": "vit_tiny", "image_size": 56, "resize_size": 64, "batch_size": 4}
COPY = {"arch": "vit_tiny", "image_size": 28, "resize_size": 32, "batch_size": 4, "dtype": "float32"}


def _row(i: int, path, status="ok", dataset="pool"):
    return dict(
        image_id=1000 + i, dataset=dataset, uri=str(path), kind="file", path=str(path), member=None,
        offset=None, size=None, sha256=None, width=None, height=None, format="png", status=status,
        error=None if status == "ok" else "probe failed",
    )  # fmt: skip


@pytest.fixture
def job(tmp_path):
    """Ingest table by hand: part 0 (4 ok, 1 corrupt), part 1 (2 ok + 1 ingest error), part 2 (empty)."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(8):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        if i == 2:
            p.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            mode = "L" if i == 5 else "RGB"
            shape = (30 + 7 * i, 45) if mode == "L" else (30 + 7 * i, 45, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(p)
        files.append(p)
    part0 = [_row(i, files[i]) for i in range(5)]
    part1 = [
        _row(5, files[5], dataset="seed:s"),
        _row(6, files[6], dataset="eval:e"),
        _row(7, files[7], "error"),
    ]
    for index, rows in enumerate([part0, part1, []]):
        write_parquet_atomic(
            pa.Table.from_pylist(rows, IMAGES),
            layout.table_part(tmp_path / "out", layout.IMAGES, index),
            IMAGES,
        )
    spec = parse_job_spec(
        {
            "name": "t",
            "output_dir": str(tmp_path / "out"),
            "pool": [{"uri": str(tmp_path / "img")}],
            "sampling": {"target_size": 5},
            "ray": {"num_cpus": 2},
            "embedding": {"retrieval": RETRIEVAL, "copy_detection": COPY},
        }
    )
    return spec, files


def test_two_models_in_one_pass_with_a_failure_recorded_and_resume(job, ray_local):
    spec, files = job
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=embed.STAGE)
    summary = embed.run(ctx)
    # 7 ok rows (the ingest error row is not embedded); the corrupt file is recorded, not fatal.
    assert summary.images == 7 and summary.errors == 1
    assert summary.decoded == 7  # each image read and decoded once for both models
    assert summary.models == ["retrieval", "copy_detection"]
    assert summary.dims == {"retrieval": 192, "copy_detection": 192}

    stage = ctx.stage_dir
    for name, dtype in (("retrieval", "float16"), ("copy_detection", "float32")):
        t0 = pq.read_table(layout.part_path(stage, 0, name))
        assert t0.schema.equals(embeddings_schema(192, dtype))
        assert t0.column("image_id").to_pylist() == [1000, 1001, 1002, 1003, 1004]
        assert t0.column("model").to_pylist() == [name] * 5
        assert t0.column("vector").null_count == 1 and t0.column("vector")[2].as_py() is None
        assert "cannot decode image" in t0.column("error")[2].as_py()
        assert pq.read_table(layout.part_path(stage, 1, name)).column("image_id").to_pylist() == [
            1005,
            1006,
        ]
        assert pq.read_table(layout.part_path(stage, 2, name)).num_rows == 0

    # Vectors equal the bare computation: same bytes, same preprocessing, same (seeded) model.
    for name, mspec, tol in (
        ("retrieval", spec.embedding.retrieval, 2e-3),
        ("copy_detection", spec.embedding.copy_detection, 1e-5),
    ):
        model = load_embedding_model(mspec, "cpu")
        ids, vecs = read_embeddings(stage, name)
        assert ids.tolist() == [1000, 1001, 1003, 1004, 1005, 1006]
        ref = model(np.stack([preprocess_image(files[i - 1000].read_bytes(), model.preprocess) for i in ids]))
        np.testing.assert_allclose(vecs, ref, atol=tol)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=tol)
        # The reader the curation stages use sees the same vectors.
        got_ids, got = load_vectors(layout.list_parts(stage, name), name, np.arange(1000, 1010))
        assert got_ids.tolist() == ids.tolist()
        np.testing.assert_allclose(got, vecs, atol=tol)

    # Rerun: nothing to do. Lose one part: only that part is redone, same content.
    again = embed.run(ctx)
    assert again.parts_written == 0 and again.decoded == 0 and again.images == 7
    before = pq.read_table(layout.part_path(stage, 1, "copy_detection"))
    layout.part_path(stage, 1, "copy_detection").unlink()
    resumed = embed.run(ctx)
    assert resumed.parts_written == 1 and resumed.decoded == 2
    assert pq.read_table(layout.part_path(stage, 1, "copy_detection")).equals(before)


def test_decode_batch_reads_each_image_once_for_two_preprocessings(job):
    spec, files = job
    configs, key_of = embed.preprocess_keys(embed.model_specs(spec))
    assert len(configs) == 2 and key_of["retrieval"] != key_of["copy_detection"]
    reads = []

    def counting_reader(kind, path, member, offset, size):
        reads.append(path)
        with open(path, "rb") as f:
            return f.read()

    n = 4
    batch = {
        "image_id": np.arange(n),
        "part": np.zeros(n, np.int64),
        "part_rows": np.full(n, n),
        "kind": np.array(["file"] * n, dtype=object),
        "path": np.array([str(f) for f in files[:n]], dtype=object),
        "member": np.array([None] * n, dtype=object),
        "offset": np.array([None] * n, dtype=object),
        "size": np.array([None] * n, dtype=object),
    }
    out = embed.decode_batch(batch, configs, read_bytes=counting_reader)
    assert sorted(reads) == sorted(str(f) for f in files[:n])  # once each, not once per model
    assert out[f"pixels_{key_of['retrieval']}"].shape == (n, 56, 56, 3)
    assert out[f"pixels_{key_of['copy_detection']}"].shape == (n, 28, 28, 3)
    assert [bool(e) for e in out["error"]] == [False, False, True, False]
    # Equal preprocessing is shared: one crop column for two models.
    same = embed.model_specs(spec.model_copy(update={"embedding": spec.embedding.model_copy(
        update={"copy_detection": spec.embedding.retrieval})}))  # fmt: skip
    configs, key_of = embed.preprocess_keys(same)
    assert len(configs) == 1 and key_of["retrieval"] == key_of["copy_detection"]


def test_a_bad_checkpoint_fails_before_any_work(job, tmp_path):
    import torch

    from lvd.embeddings.checkpoints import CheckpointError
    from lvd.embeddings.vit import build_vit

    spec, _ = job
    sd = build_vit("vit_tiny", img_size=56).state_dict()
    sd["blocks.0.attn.qkv.weight_typo"] = sd.pop("blocks.0.attn.qkv.weight")
    torch.save(sd, tmp_path / "bad.pth")
    bad = spec.embedding.retrieval.model_copy(update={"weights": str(tmp_path / "bad.pth")})
    spec = spec.model_copy(update={"embedding": spec.embedding.model_copy(update={"retrieval": bad})})
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=embed.STAGE)
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight_typo"):
        embed.run(ctx)
    assert not ctx.stage_dir.exists() or not any(
        layout.list_parts(ctx.stage_dir, m) for m in ("retrieval", "copy_detection")
    )
