"""The Ray embed stage on a handful of images: both models in one pass, failures recorded, resume by part."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import lvd.jobs.stages.embed as embed
from lvd.curation.stage_io import load_vectors
from lvd.embeddings import embed_worker
from lvd.embeddings.models import load_embedding_model
from lvd.embeddings.preprocess import preprocess_image
from lvd.embeddings.store import embeddings_table, read_embeddings
from lvd.jobs.stage import StageContext
from lvd.schemas import layout
from lvd.schemas.job_spec import parse_job_spec
from lvd.schemas.tables import IMAGES, embeddings_schema, write_parquet_atomic

RETRIEVAL = {"arch": "vit_tiny", "weights": "random", "image_size": 56, "resize_size": 64, "batch_size": 4}
COPY = {
    "arch": "vit_tiny",
    "weights": "random",
    "image_size": 28,
    "resize_size": 32,
    "batch_size": 4,
    "dtype": "float32",
}


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


def test_two_models_in_one_pass_with_a_failure_recorded_and_resume(job, ray_local, caplog):
    spec, files = job
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=embed.STAGE)
    with caplog.at_level("WARNING", logger="lvd"):
        summary = embed.run(ctx)
    # Random weights are an opt-in, and said out loud: in the log, the summary and its funnel row.
    assert summary.weights == {"retrieval": "random", "copy_detection": "random"}
    assert summary.random_weights == "retrieval, copy_detection"
    assert ("models with random weights", "retrieval, copy_detection") in summary.funnel()
    assert sum("RANDOM weights" in r.getMessage() for r in caplog.records) == 2
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
    configs, key_of = embed_worker.preprocess_keys(embed.model_specs(spec))
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
        "row": np.arange(n),
        "part_rows": np.full(n, n),
        "kind": np.array(["file"] * n, dtype=object),
        "path": np.array([str(f) for f in files[:n]], dtype=object),
        "member": np.array([None] * n, dtype=object),
        "offset": np.array([None] * n, dtype=object),
        "size": np.array([None] * n, dtype=object),
    }
    out = embed_worker.decode_batch(batch, configs, read_bytes=counting_reader)
    assert sorted(reads) == sorted(str(f) for f in files[:n])  # once each, not once per model
    assert out[f"pixels_{key_of['retrieval']}"].shape == (n, 56, 56, 3)
    assert out[f"pixels_{key_of['copy_detection']}"].shape == (n, 28, 28, 3)
    assert [bool(e) for e in out["error"]] == [False, False, True, False]
    # Equal preprocessing is shared: one crop column for two models.
    same = embed.model_specs(spec.model_copy(update={"embedding": spec.embedding.model_copy(
        update={"copy_detection": spec.embedding.retrieval})}))  # fmt: skip
    configs, key_of = embed_worker.preprocess_keys(same)
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


# ---------------------------------------------------------------- parts written by the actors


@pytest.fixture
def many_parts(tmp_path):
    """Six ingest parts: 5 ok + 1 corrupt; only ingest errors; 7 ok; 1 ok; no rows at all; 4 ok.
    Image ids are not in file order, so sorting by image_id is visible."""
    rng = np.random.default_rng(1)
    sizes = [6, 2, 7, 1, 0, 4]
    parts, k = [], 0
    for index, n in enumerate(sizes):
        rows = []
        for j in range(n):
            p = tmp_path / "img" / f"{index}-{j}.png"
            p.parent.mkdir(exist_ok=True)
            if (index, j) == (0, 3):
                p.write_bytes(b"\x89PNG\r\n\x1a\n cut")
            else:
                Image.fromarray(rng.integers(0, 256, (20 + 3 * j, 33, 3), dtype=np.uint8)).save(p)
            status = "error" if index == 1 else "ok"
            rows.append(_row(int(rng.integers(0, 10**6)) * 10 + k, p, status))
            k += 1
        parts.append(rows)
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
            "embedding": {
                "retrieval": {**RETRIEVAL, "batch_size": 3},
                "copy_detection": {**COPY, "batch_size": 3},
                "num_actors": 2,
                "cpus_per_actor": 0.5,
            },
        }
    )
    return spec, parts


def _expected_part(spec, rows: list[dict], model: str) -> pa.Table:
    """A part as the driver-side writer made it: ok rows sorted by image_id, one batch, in process."""
    models = embed.model_specs(spec)
    configs, key_of = embed_worker.preprocess_keys(models)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["image_id"])
    dim = 192
    if not ok:
        return embeddings_schema(dim, models[model].dtype).empty_table()
    batch = {k: np.array([r[k] for r in ok], dtype=object) for k in embed_worker.ROW_COLUMNS}
    batch.update(part=np.zeros(len(ok)), row=np.arange(len(ok)), part_rows=np.full(len(ok), len(ok)))
    decoded = embed_worker.decode_batch(batch, configs)
    m = load_embedding_model(models[model], "cpu")
    good = np.array([e == "" for e in decoded["error"]])
    vecs = np.zeros((len(ok), dim), np.float32)
    vecs[good] = m.embed_uint8(decoded[f"pixels_{key_of[model]}"][good])
    errors = [e or None for e in decoded["error"]]
    return embeddings_table(np.array([r["image_id"] for r in ok]), vecs, errors, model, models[model].dtype)


def _assert_part_equal(got: pa.Table, want: pa.Table, atol: float) -> None:
    assert got.schema.equals(want.schema)
    for name in ("image_id", "model"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist()
    # PIL's message names the address of its buffer: compare up to it.
    assert [e and e.split(" <")[0] for e in got.column("error").to_pylist()] == [
        e and e.split(" <")[0] for e in want.column("error").to_pylist()
    ]
    assert got.column("vector").is_null().to_pylist() == want.column("vector").is_null().to_pylist()
    if got.num_rows:
        g, w = (np.array([v or [0] * 192 for v in t.column("vector").to_pylist()]) for t in (got, want))
        np.testing.assert_allclose(g, w, atol=atol)  # batches differ: the forward pass may round differently


def _embed_actors() -> int:
    """Model actors this Ray instance has started (dead ones included)."""
    from ray._private.state import actors  # no public API lists actors without the dashboard

    return sum("EmbedActor" in a["ActorClassName"] for a in actors().values())


def test_actors_write_every_part_and_the_driver_gets_only_counts(many_parts, ray_local, monkeypatch):
    import ray.data

    spec, parts = many_parts
    seen_columns: set[str] = set()
    iter_batches = ray.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):  # what the driver pulls out of the pipeline
        for batch in iter_batches(self, *args, **kwargs):
            seen_columns.update(batch)
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    ctx = StageContext(spec=spec, out_dir=Path(spec.output_dir), stage=embed.STAGE)
    actors = _embed_actors()
    summary = embed.run(ctx)
    assert _embed_actors() - actors == 2  # the spec's two replicas both ran
    assert seen_columns == set(embed_worker.RESULT_COLUMNS)  # counts per part: no vector, no pixels
    assert (summary.images, summary.errors, summary.decoded) == (18, 1, 18)
    assert summary.parts_written == 6
    for index, rows in enumerate(parts):
        for name, tol in (("retrieval", 2e-3), ("copy_detection", 1e-5)):
            got = pq.read_table(layout.part_path(ctx.stage_dir, index, name))
            _assert_part_equal(got, _expected_part(spec, rows, name), tol)
    assert not ctx.scratch_dir(embed.CHUNKS).exists()  # chunks are merged and removed

    # A killed run: part 2's copy-detection file lost, and a chunk of garbage left in the scratch.
    stage = ctx.stage_dir
    before = {p.name: (p.stat().st_mtime_ns, pq.read_table(p)) for p in stage.glob("part-*.parquet")}
    layout.part_path(stage, 2, "copy_detection").unlink()
    stale = pa.table(
        {
            "row": pa.array([0], pa.int64()),
            "image_id": pa.array([-1], pa.int64()),
            "error": pa.array([None], pa.string()),
            "vector_retrieval": pa.array([[9.0] * 192], pa.list_(pa.float16(), 192)),
            "vector_copy_detection": pa.array([[9.0] * 192], pa.list_(pa.float32(), 192)),
        }
    )
    stale_path = layout.embed_chunk_path(ctx.scratch_dir(embed.CHUNKS), 2, 0, 1)
    stale_path.parent.mkdir(parents=True)
    pq.write_table(stale, stale_path)
    resumed = embed.run(ctx)
    assert (resumed.parts_written, resumed.parts_skipped, resumed.decoded) == (1, 5, 7)
    assert (resumed.images, resumed.errors) == (18, 1)
    for p in stage.glob("part-*.parquet"):
        mtime, table = before[p.name]
        assert pq.read_table(p).equals(table), p.name
        if layout.part_index(p) != 2:
            assert p.stat().st_mtime_ns == mtime, p.name  # other parts were not rewritten
    assert not ctx.scratch_dir(embed.CHUNKS).exists()


def _decoded(n: int, part: int = 0, start: int = 0, errors=()) -> dict[str, np.ndarray]:
    rows = np.arange(start, start + n)
    return {
        "image_id": 100 - rows,
        "part": np.full(n, part),
        "row": rows,
        "part_rows": np.full(n, 6),
        "error": np.array(["bad" if r in errors else "" for r in rows], dtype=object),
        "reads": np.ones(n, np.int64),
    }


def test_finalize_merges_chunks_of_retried_batches_and_refuses_a_missing_row(tmp_path):
    rng = np.random.default_rng(0)
    vectors = {"retrieval": rng.normal(size=(6, 8)).astype(np.float32)}
    dtypes, dims = {"retrieval": "float16"}, {"retrieval": 8}
    ingest = tmp_path / "ingest.parquet"
    rows = [_row(i, tmp_path / f"{i}.png") for i in range(6)]
    write_parquet_atomic(pa.Table.from_pylist(rows, IMAGES), ingest, IMAGES)
    chunks, out = tmp_path / "chunks", tmp_path / "out"

    def write(start: int, n: int) -> dict:
        batch = _decoded(n, start=start, errors=(4,))
        return embed_worker.write_chunks(
            batch, {"retrieval": vectors["retrieval"][start : start + n]}, chunks, dtypes
        )

    counts = write(0, 4)
    assert {k: v.tolist() for k, v in counts.items()} == {
        "part": [0], "rows": [4], "part_rows": [6], "errors": [0], "reads": [4]
    }  # fmt: skip
    write(2, 4)  # a retry that batched the rows otherwise: rows 2 and 3 twice
    kwargs = dict(stage_dir=str(out), chunk_root=str(chunks), dtypes=dtypes, dims=dims)
    result = embed_worker.finalize_part((0, str(ingest)), **kwargs)
    assert result == {"part": 0, "rows": 6, "errors": 1}
    table = pq.read_table(layout.part_path(out, 0, "retrieval"))
    assert table.column("image_id").to_pylist() == [95, 96, 97, 98, 99, 100]  # sorted by image_id
    want = embeddings_table(
        np.arange(100, 94, -1)[::-1],
        vectors["retrieval"][::-1],
        [None, "bad", None, None, None, None],
        "retrieval",
    )
    assert table.equals(want)
    assert not layout.embed_chunk_dir(chunks, 0).exists()
    # Run again (a retried merge after its files were written): same answer, nothing rewritten.
    assert embed_worker.finalize_part((0, str(ingest)), **kwargs) == result

    layout.part_path(out, 0, "retrieval").unlink()
    write(0, 3)
    write(4, 2)  # row 3 never arrived
    with pytest.raises(RuntimeError, match="5 of its 6 ok rows"):
        embed_worker.finalize_part((0, str(ingest)), **kwargs)
    assert not layout.part_path(out, 0, "retrieval").exists()


def test_the_actor_sets_the_wait_policy_before_torch_loads(tmp_path):
    """The policy reaches libgomp only if it is in the environment when torch is imported."""
    code = """
import os, sys
seen = []
class Watch:  # records the policy at the moment torch is imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
from lvd.embeddings.embed_worker import EmbedActor
EmbedActor({}, {}, 1, sys.argv[1], omp_wait_policy="PASSIVE")
print(seen)
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "['PASSIVE']"
