"""Embed stage: every ok image of the `images` table through the retrieval model (and the copy-detection
model when the spec names one), in one pass that reads and decodes each image once.

Ray Data pipeline, streaming:
  ingest parts (one row each) -> read the part's ok rows (CPU task)
  -> read bytes + decode + resize/crop to uint8, once per image for all models (CPU tasks)
  -> normalise + forward in an actor pool of model replicas (one per GPU; CPU here)
  -> the driver buffers rows per ingest part and writes `embed/<model>/part-N.parquet` atomically
     when all of part N's rows have arrived (every row carries its part's row count).
A rerun skips parts that exist for every model, so a killed run resumes where it stopped (the stage
runner clears the folder when the embedding spec or the ingest output changed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.image_io import read_image_bytes
from lvd.embeddings.preprocess import (
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
    resize_center_crop,
    to_rgb,
)
from lvd.embeddings.store import embeddings_table
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec, ModelSpec
from lvd.schemas.layout import COPY_DETECTION, RETRIEVAL
from lvd.schemas.tables import embeddings_schema, write_parquet_atomic

log = logging.getLogger("lvd")

ROW_COLUMNS = ["image_id", "kind", "path", "member", "offset", "size"]
DECODE_BATCH = 16  # images per decode task call: small enough to keep the actors fed early
DECODE_CPUS = 1  # decode is single-threaded PIL work


def model_specs(spec: JobSpec) -> dict[str, ModelSpec]:
    """The models to run by table name; without a copy-detection model only retrieval vectors are made."""
    models = {RETRIEVAL: spec.embedding.retrieval}
    if spec.embedding.copy_detection is not None:
        models[COPY_DETECTION] = spec.embedding.copy_detection
    return models


# ---------------------------------------------------------------- the per-row work (plain functions)


def read_part_rows(batch: pa.Table) -> pa.Table:
    """Ingest parts -> their ok rows, each tagged with its part index and the part's ok-row count."""
    tables = []
    for index, file in zip(batch.column("part").to_pylist(), batch.column("file").to_pylist(), strict=True):
        t = pq.read_table(file, columns=[*ROW_COLUMNS, "status"])
        t = t.filter(pc.equal(t.column("status"), "ok")).select(ROW_COLUMNS)
        t = t.append_column("part", pa.array(np.full(t.num_rows, index, dtype=np.int64)))
        tables.append(t.append_column("part_rows", pa.array(np.full(t.num_rows, t.num_rows, dtype=np.int64))))
    return pa.concat_tables(tables)


def decode_batch(
    batch: dict[str, np.ndarray],
    preprocess: dict[str, PreprocessConfig],
    read_bytes: Callable[..., bytes] = read_image_bytes,
) -> dict[str, np.ndarray]:
    """Read and decode each image once, and crop it for every distinct preprocessing in `preprocess`.

    Output: image_id, part, part_rows, error ("" when fine), reads (1 per image: the number of times its
    bytes were read), and one uint8 [B, S, S, 3] column per preprocessing key. Failed rows get zeros.
    """
    n = len(batch["image_id"])
    crops = {k: np.zeros((n, c.crop_size, c.crop_size, 3), np.uint8) for k, c in preprocess.items()}
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            data = read_bytes(
                str(batch["kind"][i]),
                str(batch["path"][i]),
                None if batch["member"][i] is None else str(batch["member"][i]),
                None if _isnull(batch["offset"][i]) else int(batch["offset"][i]),
                None if _isnull(batch["size"][i]) else int(batch["size"][i]),
            )
            rgb = to_rgb(decode_image(data))
            for k, cfg in preprocess.items():
                crops[k][i] = resize_center_crop(rgb, cfg)
        except ImageDecodeError as err:
            errors[i] = str(err)
        except Exception as err:  # noqa: BLE001 - unreadable file, odd mode: recorded, not fatal
            errors[i] = f"{type(err).__name__}: {err}"
    out = {k: batch[k] for k in ("image_id", "part", "part_rows")}
    out.update(error=errors, reads=np.ones(n, np.int64))
    out.update({f"pixels_{k}": v for k, v in crops.items()})
    return out


def decode_memory_bytes(max_pixels: int) -> int:
    return 2 * 3 * max_pixels + (64 << 20)


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def preprocess_keys(models: dict[str, ModelSpec]) -> tuple[dict[str, PreprocessConfig], dict[str, str]]:
    """Distinct preprocessing configs (models with equal sizes share one crop) and model -> key."""
    configs: dict[str, PreprocessConfig] = {}
    key_of: dict[str, str] = {}
    for name, m in models.items():
        # Patch size of a TorchScript model is unknown: crop to image_size exactly.
        cfg = PreprocessConfig(m.resize_size, m.image_size, 1 if m.arch == "torchscript" else m.patch_size)
        key = next((k for k, c in configs.items() if c == cfg), str(len(configs)))
        configs[key] = cfg
        key_of[name] = key
    return configs, key_of


class EmbedActor:
    """One replica of every model; maps decoded crops to L2-normalised float32 vectors."""

    def __init__(self, models: dict[str, dict], pixel_key: dict[str, str], cpu_threads: int) -> None:
        import torch

        from lvd.embeddings.models import load_embedding_model

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, cpu_threads))
        self.models = {name: load_embedding_model(ModelSpec(**m)) for name, m in models.items()}
        self.pixel_key = pixel_key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        out = {k: batch[k] for k in ("image_id", "part", "part_rows", "error", "reads")}
        for name, model in self.models.items():
            vecs = np.zeros((len(ok), model.dim), np.float32)
            if ok.any():
                vecs[ok] = model.embed_uint8(batch[f"pixels_{self.pixel_key[name]}"][ok])
            out[f"vector_{name}"] = vecs
        return out


# ---------------------------------------------------------------- the driver


class PartWriter:
    """Buffers rows per ingest part and writes a part's tables once all its rows have arrived."""

    def __init__(self, stage_dir: Path, models: dict[str, ModelSpec]) -> None:
        self.stage_dir = stage_dir
        self.models = models
        self.buffers: dict[int, list[dict[str, np.ndarray]]] = {}
        self.counts: dict[int, int] = {}
        self.written: list[int] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        parts = batch["part"]
        for part in np.unique(parts):
            sel = parts == part
            rows = {k: v[sel] for k, v in batch.items()}
            p = int(part)
            self.buffers.setdefault(p, []).append(rows)
            self.counts[p] = self.counts.get(p, 0) + int(sel.sum())
            expected = int(rows["part_rows"][0])
            if self.counts[p] > expected:
                raise RuntimeError(f"part {p}: {self.counts[p]} rows arrived, {expected} expected")
            if self.counts[p] == expected:
                self._write(p, self.buffers.pop(p))

    def _write(self, part: int, chunks: list[dict[str, np.ndarray]]) -> None:
        cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        order = np.argsort(cols["image_id"], kind="stable")
        errors = [e if e else None for e in cols["error"][order]]
        for name, m in self.models.items():
            table = embeddings_table(
                cols["image_id"][order], cols[f"vector_{name}"][order], errors, name, m.dtype
            )
            write_parquet_atomic(table, layout.part_path(self.stage_dir, part, name), table.schema)
        self.written.append(part)

    def write_empty(self, part: int, dims: dict[str, int]) -> None:
        """An ingest part without ok images still gets (empty) parts, so resume sees it done."""
        for name, m in self.models.items():
            schema = embeddings_schema(dims[name], m.dtype)
            write_parquet_atomic(schema.empty_table(), layout.part_path(self.stage_dir, part, name), schema)
        self.written.append(part)


def check_models(models: dict[str, ModelSpec]) -> dict[str, int]:
    """Vector width per model. Checkpoints are loaded here once (memory-mapped), so a wrong key or
    shape fails before any Ray work rather than inside every actor."""
    from lvd.embeddings.models import load_embedding_model
    from lvd.embeddings.vit import ARCHS

    return {
        name: load_embedding_model(m, "cpu").dim if m.weights else ARCHS[m.arch].embed_dim
        for name, m in models.items()
    }


def _dims_on_disk(stage_dir: Path, models: dict[str, ModelSpec]) -> dict[str, int]:
    dims = {}
    for name in models:
        part = layout.list_parts(stage_dir, name)[0]
        dims[name] = pq.read_schema(part).field("vector").type.list_size
    return dims


def _totals(stage_dir: Path, models: dict[str, ModelSpec]) -> tuple[int, int]:
    images = errors = 0
    for p in layout.list_parts(stage_dir, RETRIEVAL):
        err = pq.read_table(p, columns=["error"]).column("error")
        images += len(err)
        errors += len(err) - err.null_count
    return images, errors


@dataclass
class EmbedSummary(StageSummary):
    FUNNEL = (("embed errors", "errors"),)
    images: int = 0
    errors: int = 0
    models: list[str] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)
    decoded: int = 0
    parts_written: int = 0
    parts_skipped: int = 0
    images_per_second: float | None = None


def run(ctx: StageContext) -> EmbedSummary:
    import ray

    spec = ctx.spec
    stage_dir = ctx.output_dir(layout.EMBEDDINGS)
    models = model_specs(spec)
    ingest_parts = ctx.parts(layout.IMAGES)
    if not ingest_parts:
        raise FileNotFoundError(f"no images table in {ctx.input_dir(layout.IMAGES)}: run ingest first")
    todo = [
        (layout.part_index(p), p)
        for p in ingest_parts
        if not all(layout.part_path(stage_dir, layout.part_index(p), name).exists() for name in models)
    ]
    dims = check_models(models) if todo else _dims_on_disk(stage_dir, models)
    writer = PartWriter(stage_dir, models)
    reads = 0
    t0 = time.perf_counter()
    if todo:
        ctx.ray()
        t0 = time.perf_counter()
        configs, pixel_key = preprocess_keys(models)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        emb = spec.embedding
        num_actors = min(emb.num_actors, gpus) if gpus else emb.num_actors
        batch_size = max(m.batch_size for m in models.values())
        ds = ray.data.from_items(
            [{"part": i, "file": str(p)} for i, p in todo], override_num_blocks=len(todo)
        )
        ds = ds.map_batches(read_part_rows, batch_size=1, batch_format="pyarrow")
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"preprocess": configs},
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
            # Room for the largest image ingest lets through (RGB, plus a converted copy). Also, as the
            # request differs from the actors', Ray does not fuse decode into the model actors: decode
            # stays in its own CPU tasks and overlaps the forward passes.
            memory=decode_memory_bytes(spec.ingest.max_pixels),
        )
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "models": {n: m.model_dump() for n, m in models.items()},
                "pixel_key": pixel_key,
                "cpu_threads": max(1, round(emb.cpus_per_actor)),
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_actors)),
            num_gpus=1 if gpus else 0,
            num_cpus=emb.cpus_per_actor,
            batch_size=batch_size,
            batch_format="numpy",
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            reads += int(batch["reads"].sum())
            writer.add(batch)
        if writer.buffers:
            incomplete = {p: sum(len(c["image_id"]) for c in ch) for p, ch in writer.buffers.items()}
            raise RuntimeError(f"parts with rows missing after the pipeline ended: {incomplete}")
        for index, _ in todo:
            if index not in writer.written:  # no ok rows in this ingest part
                writer.write_empty(index, dims)
    seconds = time.perf_counter() - t0
    images, errors = _totals(stage_dir, models)
    log.info("embed: %d parts written, %d skipped, %.1f s", len(todo), len(ingest_parts) - len(todo), seconds)
    return EmbedSummary(
        images=images,
        errors=errors,
        models=list(models),
        dims=dims,
        decoded=reads,
        parts_written=len(todo),
        parts_skipped=len(ingest_parts) - len(todo),
        images_per_second=round(reads / seconds, 2) if reads and seconds > 0 else None,
    )


STAGE = Stage(
    name="embed",
    reads=(layout.IMAGES,),
    writes=(layout.EMBEDDINGS,),
    spec_sections=("embedding",),
    resources=Resources(engine="ray", gpu=True),
    summary=EmbedSummary,
    run=run,
)
