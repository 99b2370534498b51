"""Embed stage: every ok image of the `images` table through the retrieval model (and the copy-detection
model when the spec names one), in one pass that reads and decodes each image once.

Ray Data pipeline, streaming; the per-row work is `lvd.embeddings.embed_worker`:
  ingest parts (one row each) -> read the part's ok rows (CPU task)
  -> read bytes + decode + resize/crop to uint8, once per image for all models (CPU tasks)
  -> normalise + forward in an actor pool of model replicas (one per GPU; CPU here); each actor
     writes its vectors as chunk files, one per ingest part in its batch, and returns counts
  -> the driver adds up the counts per part; when all of part N's rows are in chunks (every row
     carries its part's ok-row count) a task merges them into `part-N-<model>.parquet` atomically.
No vector reaches the driver: it holds per-part counters only. A rerun skips parts that exist for
every model, so a killed run resumes where it stopped; chunks of unfinished parts are dropped and
their parts redone (the stage runner clears the folder when the embedding spec or the ingest
output changed).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from lvd.embeddings.cpu_threads import chosen_policy
from lvd.embeddings.embed_worker import (
    RESULT_COLUMNS,
    EmbedActor,
    decode_batch,
    decode_memory_bytes,
    finalize_part,
    preprocess_keys,
    read_part_rows,
)
from lvd.embeddings.store import part_counts
from lvd.jobs.progress import Progress
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import run_tasks
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec, ModelSpec
from lvd.schemas.layout import COPY_DETECTION, RETRIEVAL
from lvd.schemas.tables import write_json_atomic

log = logging.getLogger("lvd")

DECODE_BATCH = 16  # images per decode task call: small enough to keep the actors fed early
DECODE_CPUS = 1  # decode is single-threaded PIL work
FINALIZE_CPUS = 1
CHUNKS = "vector_chunks"  # scratch folder of the actors' chunk files


def model_specs(spec: JobSpec) -> dict[str, ModelSpec]:
    """The models to run by table name; with copy_detection null only retrieval vectors are made."""
    models = {RETRIEVAL: spec.embedding.retrieval}
    if spec.embedding.copy_detection is not None:
        models[COPY_DETECTION] = spec.embedding.copy_detection
    return models


def check_models(models: dict[str, ModelSpec]) -> dict[str, int]:
    """Vector width per model. Checkpoints are loaded here once (memory-mapped), so a wrong key or
    shape fails before any Ray work rather than inside every actor."""
    from lvd.embeddings.models import load_embedding_model
    from lvd.embeddings.vit import ARCHS

    return {
        name: ARCHS[m.arch].embed_dim
        if m.random_init and m.arch in ARCHS
        else load_embedding_model(m, "cpu").dim
        for name, m in models.items()
    }


def _dims_on_disk(stage_dir: Path, models: dict[str, ModelSpec]) -> dict[str, int]:
    dims = {}
    for name in models:
        part = layout.list_parts(stage_dir, name)[0]
        dims[name] = pq.read_schema(part).field("vector").type.list_size
    return dims


def images_part_digest(path: str) -> str:
    """Task: what an embeddings part depends on in its images part: each row's id, status and
    content hash (not its path), so a part ingested again or moved keeps its digest."""
    import hashlib

    t = pq.read_table(path, columns=["image_id", "status", "sha256"])
    h = hashlib.sha256()
    h.update(t["image_id"].to_numpy().tobytes())
    for name in ("status", "sha256"):
        h.update("\0".join(v or "" for v in t[name].to_pylist()).encode())
    return h.hexdigest()[:16]


def model_fingerprint(models: dict[str, ModelSpec]) -> str:
    """What the vectors depend on besides the images: each model's settings, with a local weights
    file named by its content (sha256) rather than its path, so a moved job keeps its embeddings."""
    import hashlib

    from lvd.schemas.tables import file_sha256

    data = {}
    for name, m in models.items():
        d = m.model_dump(mode="json")
        weights = d.get("weights")
        if weights and weights != "random" and "://" not in weights and Path(weights).is_file():
            d["weights"] = d.get("sha256") or file_sha256(Path(weights))
        data[name] = d
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def adopt_previous_parts(
    ctx: StageContext,
    stage_dir: Path,
    digests: dict[int, str],
    models: dict[str, ModelSpec],
    fingerprint: str,
) -> set[int]:
    """Move into place the earlier run's parts (same `model_fingerprint`) embedded from an images
    part with the same digest, wherever that part now sits; return the adopted part indexes."""
    previous = ctx.previous_dir
    if previous is None:
        return set()
    try:
        inputs = json.loads((previous / layout.EMBED_INPUTS).read_text())
        old = inputs["digests"]
    except (OSError, ValueError, KeyError):
        return set()
    if inputs.get("models") != fingerprint:
        return set()  # other models or settings: nothing to reuse
    old_index = {d: int(j) for j, d in old.items()}
    adopted = set()
    for i, digest in digests.items():
        j = old_index.get(digest)
        if j is None or any(layout.part_path(stage_dir, i, n).exists() for n in models):
            continue
        sources = [layout.part_path(previous, j, n) for n in models]
        if all(p.exists() for p in sources):
            for n, p in zip(models, sources, strict=True):
                p.rename(layout.part_path(stage_dir, i, n))
            adopted.add(i)
    return adopted


class PartFinalizer:
    """Counts embedded rows per ingest part from the actors' results and starts a part's merge task
    as soon as all its rows are in chunks. Holds per-part counters and task handles only."""

    def __init__(self, files: dict[int, str], progress: Progress, **finalize_kwargs) -> None:
        import ray

        self.files = files
        self.progress = progress
        self.remote = ray.remote(finalize_part).options(num_cpus=FINALIZE_CPUS)
        self.kwargs = finalize_kwargs
        self.shared = {k: ray.put(v) for k, v in finalize_kwargs.items()}
        self.embedded: dict[int, int] = {}
        self.expected: dict[int, int] = {}
        self.expected_sum = 0
        self.pending: dict = {}  # task -> part
        self.results: dict[int, dict[str, int]] = {}
        self.reads = 0

    def add(self, batch: dict) -> None:
        """One batch of actor results (RESULT_COLUMNS per row)."""
        for part, rows, part_rows, reads in zip(
            *(batch[k].tolist() for k in ("part", "rows", "part_rows", "reads")), strict=True
        ):
            self.reads += reads
            if part not in self.expected:
                self.expected[part] = part_rows
                self.expected_sum += part_rows
            self.embedded[part] = self.embedded.get(part, 0) + rows
            if self.embedded[part] > part_rows:
                raise RuntimeError(
                    f"embed part {part}: {self.embedded[part]} rows embedded, {part_rows} expected"
                )
            if self.embedded[part] == part_rows:
                self.pending[self.remote.remote((part, self.files[part]), **self.shared)] = part
            self.progress.update(rows)
        self._estimate_total()
        self._collect(block=False)

    def _estimate_total(self) -> None:
        # A part's ok-row count is known once its first rows are embedded; unseen parts are
        # counted at the mean of the seen ones, so the ETA firms up as the run goes.
        seen, known = len(self.expected), self.expected_sum
        self.progress.total = known + round(known / seen * (len(self.files) - seen)) if seen else None

    def _collect(self, block: bool) -> None:
        import ray

        while self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=None if block else 0)
            if not done:
                return
            for ref in done:
                self.pending.pop(ref)
                result = ray.get(ref)
                self.results[result["part"]] = result

    def finish(self) -> None:
        """Wait for the merges; parts without ok rows (or with rows lost) are finalized now, which
        writes empty files or raises naming the part."""
        self._collect(block=True)
        rest = [(p, f) for p, f in self.files.items() if p not in self.results]
        for r in run_tasks(
            finalize_part, rest, name="embed: finalize", num_cpus=FINALIZE_CPUS, **self.kwargs
        ):
            self.results[r["part"]] = r


@dataclass
class EmbedSummary(StageSummary):
    """weights: each model's weights as the spec gives them; random_weights: the models embedded with a
    random init (`weights: random`), "none" when every model has real weights."""

    FUNNEL = (("- embed errors", "errors"), ("models with random weights", "random_weights"))
    images: int = 0
    errors: int = 0
    models: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)
    random_weights: str = "none"
    dims: dict[str, int] = field(default_factory=dict)
    decoded: int = 0
    parts_written: int = 0
    parts_skipped: int = 0
    parts_reused: int = 0  # adopted from the run before sources were added (`reuses_previous`)
    images_per_second: float | None = None


def run(ctx: StageContext) -> EmbedSummary:
    import ray

    spec = ctx.spec
    stage_dir = ctx.output_dir(layout.EMBEDDINGS)
    models = model_specs(spec)
    ingest_parts = ctx.parts(layout.IMAGES)
    if not ingest_parts:
        raise FileNotFoundError(f"no images table in {ctx.input_dir(layout.IMAGES)}: run ingest first")
    ctx.ray()
    digests = dict(
        zip(
            (layout.part_index(p) for p in ingest_parts),
            run_tasks(images_part_digest, [str(p) for p in ingest_parts], name="embed: part digests"),
            strict=True,
        )
    )
    fingerprint = model_fingerprint(models)
    adopted = adopt_previous_parts(ctx, stage_dir, digests, models, fingerprint)
    todo = {
        layout.part_index(p): str(p)
        for p in ingest_parts
        if not all(layout.part_path(stage_dir, layout.part_index(p), name).exists() for name in models)
    }
    random_models = [name for name, m in models.items() if m.random_init]
    for name in random_models:
        log.warning("embed: the %s model has RANDOM weights (weights: random): for testing only", name)
    dims = check_models(models) if todo else _dims_on_disk(stage_dir, models)
    chunk_root = ctx.scratch_dir(CHUNKS)
    # Chunks of a killed run: their parts are in `todo` and are redone whole.
    shutil.rmtree(chunk_root, ignore_errors=True)
    counts: dict[int, tuple[int, int]] = {}
    reads = 0
    t0 = time.perf_counter()
    if todo:
        ctx.ray()
        t0 = time.perf_counter()
        configs, pixel_key = preprocess_keys(models)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        emb = spec.embedding
        # One replica per GPU where there are GPUs; never more replicas than parts to embed.
        num_actors = max(1, min(emb.num_actors, gpus or emb.num_actors, len(todo)))
        batch_size = max(m.batch_size for m in models.values())
        ds = ray.data.from_items(
            [{"part": i, "file": f} for i, f in todo.items()], override_num_blocks=len(todo)
        )
        ds = ds.map_batches(read_part_rows, batch_size=1, batch_format="pyarrow")
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"preprocess": configs},
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
            # Room for the largest image ingest lets through. Also, as the request differs from the
            # actors', Ray does not fuse decode into the model actors: decode stays in its own CPU
            # tasks and overlaps the forward passes.
            memory=decode_memory_bytes(spec.ingest.max_pixels),
        )
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "models": {n: m.model_dump() for n, m in models.items()},
                "pixel_key": pixel_key,
                "cpu_threads": max(1, round(emb.cpus_per_actor)),
                "chunk_root": str(chunk_root),
                # The actor shares its cores with the decode tasks: its torch threads sleep, not
                # spin, between ops (see embeddings/cpu_threads.py).
                "omp_wait_policy": chosen_policy(),
            },
            # A fixed pool: every replica asked for (one per GPU) starts at once.
            compute=ray.data.ActorPoolStrategy(min_size=num_actors, max_size=num_actors),
            num_gpus=1 if gpus else 0,
            num_cpus=emb.cpus_per_actor,
            batch_size=batch_size,
            batch_format="numpy",
        )
        progress = Progress("embed", None, "images")
        finalizer = PartFinalizer(
            todo,
            progress,
            stage_dir=str(stage_dir),
            chunk_root=str(chunk_root),
            dtypes={n: m.dtype for n, m in models.items()},
            dims=dims,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            finalizer.add({k: batch[k] for k in RESULT_COLUMNS})
        finalizer.finish()
        progress.close()
        reads = finalizer.reads
        counts = {p: (r["rows"], r["errors"]) for p, r in finalizer.results.items()}
    seconds = time.perf_counter() - t0
    shutil.rmtree(chunk_root, ignore_errors=True)
    write_json_atomic(
        stage_dir / layout.EMBED_INPUTS,
        {"models": fingerprint, "digests": {str(i): d for i, d in digests.items()}},
    )
    for p in ingest_parts:  # skipped parts: counted from their footers
        index = layout.part_index(p)
        if index not in counts:
            counts[index] = part_counts(layout.part_path(stage_dir, index, RETRIEVAL))
    images = sum(rows for rows, _ in counts.values())
    errors = sum(errs for _, errs in counts.values())
    log.info(
        "embed: %d parts written, %d skipped (%d from the earlier run), %.1f s",
        len(todo),
        len(ingest_parts) - len(todo),
        len(adopted),
        seconds,
    )
    return EmbedSummary(
        images=images,
        errors=errors,
        models=list(models),
        weights={name: str(m.weights) for name, m in models.items()},
        random_weights=", ".join(random_models) or "none",
        dims=dims,
        decoded=reads,
        parts_written=len(todo),
        parts_skipped=len(ingest_parts) - len(todo),
        parts_reused=len(adopted),
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
    reuses_previous=True,
)
