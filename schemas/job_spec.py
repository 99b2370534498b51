"""The job spec: one YAML file that says what to curate, how, and where to write.

Every field is validated before any work starts; a bad spec fails with the field's
path and the allowed values (pydantic's messages, reformatted by `load_job_spec`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    # Unknown keys are a typo more often than not: reject them by name.
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    """A place images come from: a folder (recursive), tar/WebDataset shards, or parquet with bytes."""

    uri: str = Field(description="Local path, glob, brace pattern or fsspec URL (s3://, gs://, file://).")
    kind: Literal["auto", "folder", "tar", "parquet"] = "auto"
    image_column: str = Field("image", description="parquet only: the column holding image bytes.")

    @field_validator("uri")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class ImageSet(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="Letters, digits, '_' and '-' only.")
    sources: list[Source] = Field(min_length=1)


class SeedSet(ImageSet):
    """A seed dataset to retrieve pool images for (DINOv2 paper, sec. 3)."""

    strategy: Literal["as_is", "sample", "cluster"]
    k: int = Field(4, ge=1, description="sample: nearest pool images per seed image.")
    min_seed_images: int = Field(
        3, ge=1, description="cluster: a pool cluster needs more than this many seeds."
    )
    images_per_cluster: int = Field(
        10_000, ge=1, description="cluster: pool images taken per selected cluster."
    )
    max_images: int = Field(1_000_000, ge=1, description="cluster: cap on pool images for this seed set.")
    num_clusters: int | None = Field(
        None,
        ge=2,
        description="cluster: k-means clusters of the pool; default is the finest clustering level.",
    )


RANDOM_WEIGHTS = "random"


class ModelSpec(_Strict):
    """An embedding model. `weights` is a local path or URL, or "random" for a seeded random init
    (testing only; a job says so in its log and report). A job spec must name it: there is no default."""

    arch: Literal[
        "vit_small",
        "vit_base",
        "vit_large",
        "vit_giant2",
        "vit_tiny",
        "vit_tiny_d4",
        "torchscript",
        "copy_descriptor",
    ] = Field(
        "vit_small",
        description="copy_descriptor: the built-in copy detector with no learned weights "
        "(lvd.embeddings.copy_descriptor), for copy_detection when no SSCD TorchScript is at hand.",
    )
    weights: str | None = Field(
        None,
        description='Checkpoint path or URL, or "random" for a seeded random init (testing only); '
        "none for copy_descriptor.",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected sha256 of the weights file, checked before it is loaded (URLs above all).",
    )
    format: Literal["auto", "dinov2", "hf", "lvd", "torchscript"] = "auto"
    patch_size: int = Field(14, ge=1)
    num_register_tokens: int = Field(0, ge=0)
    image_size: int = Field(224, ge=14)
    resize_size: int = Field(256, ge=14)
    batch_size: int = Field(32, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    # bf16 moves a network's unit vectors far less than any dedup or cluster threshold can see, and runs
    # much faster where the CPU has native bf16; benchmarks/embed.py measures the speed and
    # benchmarks/bf16_agreement.py the decisions.
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Inference precision. auto: bf16 on CUDA and on CPUs with native bf16 "
        "(AVX512-BF16, AMX), float32 elsewhere and for copy_descriptor (bf16 rounding moves its "
        "hand-made features enough to change copy decisions). A DINOv2 ViT in bf16 holds its "
        "attention and MLP weights in bf16 and keeps norms and residuals in float32; other models "
        "run under bf16 autocast.",
    )

    @model_validator(mode="after")
    def _sizes(self) -> ModelSpec:
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        if self.arch == "torchscript" and self.weights in (None, RANDOM_WEIGHTS):
            raise ValueError("arch 'torchscript' needs weights: the path of the TorchScript file")
        if self.sha256 and self.weights in (None, RANDOM_WEIGHTS):
            raise ValueError("sha256 is given but weights is not a file: nothing to check it against")
        if self.arch == "copy_descriptor" and self.weights:
            raise ValueError("arch 'copy_descriptor' is built in and takes no weights")
        return self

    @property
    def random_init(self) -> bool:
        return self.weights == RANDOM_WEIGHTS


# The input the built-in copy detector was measured with (benchmarks/dedup_quality.py): the whole
# image resized to this square.
COPY_DESCRIPTOR_SIZE = 128


def builtin_copy_detector() -> ModelSpec:
    """The copy detector a job spec gets when it names none: the built-in copy_descriptor at the
    input size it was measured at, its vectors stored in float32 (its cosines sit close to the threshold)."""
    return ModelSpec(
        arch="copy_descriptor",
        image_size=COPY_DESCRIPTOR_SIZE,
        resize_size=COPY_DESCRIPTOR_SIZE,
        dtype="float32",
    )


class EmbeddingSpec(_Strict):
    retrieval: ModelSpec = ModelSpec()
    copy_detection: ModelSpec | None = Field(
        default_factory=builtin_copy_detector,
        description="Model whose vectors dedup compares: SSCD as TorchScript in production. Unset: the "
        "built-in copy_descriptor (128 px, no learned weights). null: dedup compares the retrieval "
        "model's vectors (no second embedding pass; they find semantic neighbours, not only copies).",
    )
    num_actors: int = Field(1, ge=1, description="Model replicas (one per GPU on GPU nodes).")
    cpus_per_actor: float = Field(1.0, gt=0)


class SearchSpec(_Strict):
    """How a FAISS kNN search runs: the index (a factory string) and where the queries go."""

    index: str = Field(
        "auto",
        description="FAISS index factory string used above exact_below vectors. auto: sized for the pool "
        "and chosen for the device (fast-scan PQ with re-ranking on CPUs, SQ8 on GPUs).",
    )
    nprobe: int = Field(64, ge=1)
    exact_below: int = Field(1_000_000, ge=0, description="Use exact (flat) search below this many vectors.")
    chunk_size: int = Field(65_536, ge=1, description="Query rows per search call; bounds memory.")
    search_actors: int = Field(
        0,
        ge=0,
        description="kNN shard actors holding the database (0: one per GPU, else one per node; on a CPU "
        "cluster a small flat database is searched in one task instead).",
    )
    tables: int = Field(
        1,
        ge=1,
        description="IVF indexes over the same vectors, each with its own partition, searched together "
        "with nprobe lists each and re-ranked exactly (CPU): a pair one partition splits is usually "
        "kept together by another, so tables find more of the pairs above a copy threshold than one "
        "index with tables x nprobe. Used above exact_below vectors.",
    )


# Default (dedup.threshold, dedup.eval_threshold) per copy detector (embedding.copy_detection.arch),
# for a job spec that sets none: a cosine means something different to each detector. copy_descriptor's
# were chosen on the real-image corpus (benchmarks/dedup_quality.py); every other detector (an SSCD
# TorchScript, or the retrieval model's vectors when copy_detection is null) gets the paper's.
DEFAULT_DEDUP_THRESHOLDS = (0.6, 0.45)
DETECTOR_DEDUP_THRESHOLDS = {"copy_descriptor": (0.84, 0.84)}


def detector_dedup_thresholds(arch: str | None) -> tuple[float, float]:
    """(threshold, eval_threshold) a job spec's dedup section defaults to for copy detector `arch`
    (None: copy_detection is null, dedup compares retrieval vectors)."""
    return DETECTOR_DEDUP_THRESHOLDS.get(arch or "", DEFAULT_DEDUP_THRESHOLDS)


class DedupSpec(SearchSpec):
    k: int = Field(64, ge=1, description="Nearest neighbours per image in the copy-detection graph.")
    threshold: float = Field(
        DEFAULT_DEDUP_THRESHOLDS[0],
        gt=-1,
        le=1,
        description="Cosine above which two images are copies. Unset in a job spec: the copy detector's "
        "default (0.84 for copy_descriptor, 0.6 for SSCD or the retrieval model's vectors).",
    )
    eval_threshold: float = Field(
        DEFAULT_DEDUP_THRESHOLDS[1],
        gt=-1,
        le=1,
        description="Cosine above which a pool image matches an eval image. Unset in a job spec: the "
        "copy detector's default (0.84 for copy_descriptor, 0.45 otherwise).",
    )
    keep_rule: Literal["largest_then_smallest_id", "smallest_id"] = "largest_then_smallest_id"
    grouping: Literal["components", "leader"] = Field(
        "leader",
        description="components: one image kept per connected component of the copy graph (the paper's "
        "rule; a few edges can chain distinct images into one component). leader: images visited in "
        "keep_rule order, each dropped only when its own cosine to an already kept image passes the "
        "threshold. Default leader: on the real-image corpus (benchmarks/dedup_quality.py) it collapses "
        "the same copy groups with fewer distinct images dropped. Eval-overlap dedup always removes "
        "whole components.",
    )
    max_component_share: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Warn (log and stage summary) when one duplicate component holds more than this "
        "share of the pool: a sign of chaining or of a threshold too low for the copy detector.",
    )
    verify_from: float | None = Field(
        None,
        gt=-1,
        le=1,
        description="Pixel verification of near misses: a pair whose cosine lies in (verify_from, threshold] "
        "is a copy when the pixel verifier (lvd.curation.copy_verifier) finds the same pixels in both "
        "images (score above verify_score). The kNN graph then keeps edges down to verify_from. "
        "None: no verification (every decision is the cosine's).",
    )
    verify_score: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Pixel verifier score above which a pair in the verification band is a copy.",
    )


class RetrievalSpec(SearchSpec):
    """The search of sample-based seed sets over the kept pool."""


class ClusterLevel(_Strict):
    k: int = Field(ge=1)
    resampling_steps: int = Field(0, ge=0)


class ClusteringSpec(_Strict):
    levels: list[ClusterLevel] = Field(
        default_factory=lambda: [ClusterLevel(k=1000), ClusterLevel(k=100, resampling_steps=2)],
        min_length=1,
        description="Finest level first; each next level clusters the previous level's centroids.",
    )
    niter: int = Field(20, ge=1)
    spherical: bool = True
    max_points_per_centroid: int = Field(256, ge=1)
    lloyd_passes: int = Field(
        0,
        ge=0,
        description="Lloyd iterations over all points after the fit on the capped sample (level 0 and "
        "retrieval k-means; none when the sample is every point). Each costs about one assignment pass.",
    )
    assign_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision of the nearest-centroid passes over all points. auto: bfloat16 matmul on a "
        "CPU with native bf16 and no GPU (3.4x the fp32 speed; near ties may go to the runner-up), else "
        "FAISS float32.",
    )
    seed: int = 0
    on_new_images: Literal["assign", "refit"] = Field(
        "assign",
        description="When the stage reruns on changed inputs (a source added) with these same settings: "
        "assign keeps the earlier run's centroids and assigns every kept image to them (one "
        "nearest-centroid pass); refit fits again (the fit sample, niter iterations on it, then "
        "1 + resampling_steps assignment passes and the resampling sums passes over all images).",
    )

    @field_validator("levels")
    @classmethod
    def _decreasing(cls, levels: list[ClusterLevel]) -> list[ClusterLevel]:
        ks = [lv.k for lv in levels]
        if any(b >= a for a, b in zip(ks, ks[1:], strict=False)):
            raise ValueError(f"k must decrease from level to level (finest first), got {ks}")
        return levels


class SamplingSpec(_Strict):
    target_size: int = Field(0, ge=0, description="Images drawn by balanced hierarchical sampling (0: none).")
    max_repeats: int = Field(1, ge=1, description="How many times one image may be repeated (multiplier).")
    seed: int = 0


class ShardSpec(_Strict):
    samples_per_shard: int = Field(1000, ge=1)
    max_shard_bytes: int | None = Field(None, ge=1024, description="If set, also bound shards by bytes.")
    seed: int = 0
    on_new_images: Literal["append", "replan"] = Field(
        "append",
        description="When the stage reruns on changed inputs (a source added) with these same settings: "
        "append keeps every earlier shard whose samples are all unchanged (not rewritten) and deals the "
        "other samples into new shards numbered after the earlier ones, as a new version of the output "
        "(index.json and index-vNNNN.json name the version's shards, unchanged and new); replan deals "
        "every sample again into shards 0 .. n-1, as a first run does.",
    )


class SparkSpec(_Strict):
    master: str = "local[*]"
    driver_memory: str = "4g"
    executor_memory: str = "4g"
    conf: dict[str, str] = Field(default_factory=dict)


class RaySpec(_Strict):
    address: str | None = Field(
        None, description="None: start Ray in-process (or join the cluster a job runs on)."
    )
    num_cpus: int | None = Field(None, ge=1)


class IngestSpec(_Strict):
    max_pixels: int = Field(
        89_478_485, ge=1, description="Images above this many pixels are rejected (bombs)."
    )
    max_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Files above this size are rejected.")
    min_side: int = Field(32, ge=1, description="Images whose shorter side is below this are rejected.")
    max_aspect_ratio: float = Field(
        20.0,
        ge=1,
        description="Images whose longer side is more than this many times the shorter are rejected "
        "(before any resize: a 1 x 60000 image would resize to 256 x 15,360,000).",
    )
    files_per_part: int = Field(2000, ge=1)


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]+$")
    output_dir: str
    pool: list[Source] = Field(min_length=1)
    seeds: list[SeedSet] = Field(default_factory=list)
    eval_sets: list[ImageSet] = Field(default_factory=list)
    ingest: IngestSpec = IngestSpec()
    embedding: EmbeddingSpec = EmbeddingSpec()
    dedup: DedupSpec = DedupSpec()
    retrieval: RetrievalSpec = RetrievalSpec()
    clustering: ClusteringSpec = ClusteringSpec()
    sampling: SamplingSpec = SamplingSpec()
    shards: ShardSpec = ShardSpec()
    spark: SparkSpec = SparkSpec()
    ray: RaySpec = RaySpec()

    @field_validator("output_dir")
    @classmethod
    def _local_output(cls, v: str) -> str:
        # Stages write with local file APIs (atomic renames, Spark's local paths): an s3:// or gs://
        # output would become a local folder named "s3:". A shared mount is the way to a cluster store.
        scheme = v.split("://", 1)[0] if "://" in v else None
        if scheme == "file":
            return v.split("://", 1)[1]
        if scheme is not None:
            raise ValueError(
                f"{v!r}: only local folders (or mounts of shared storage) are supported, not {scheme}://"
            )
        return v

    @model_validator(mode="after")
    def _weights_named(self) -> JobSpec:
        models = [("retrieval", self.embedding.retrieval), ("copy_detection", self.embedding.copy_detection)]
        for name, model in models:
            if model is not None and model.weights is None and model.arch != "copy_descriptor":
                raise ValueError(
                    f"embedding.{name}.weights is required: a checkpoint path or URL, or "
                    f"{RANDOM_WEIGHTS!r} to embed with random weights (testing only)"
                )
        return self

    @model_validator(mode="after")
    def _detector_thresholds(self) -> JobSpec:
        """dedup thresholds the spec leaves unset take the copy detector's defaults; set ones stay."""
        model = self.embedding.copy_detection
        threshold, eval_threshold = detector_dedup_thresholds(model.arch if model is not None else None)
        unset = {
            name: value
            for name, value in (("threshold", threshold), ("eval_threshold", eval_threshold))
            if name not in self.dedup.model_fields_set
        }
        if unset:
            self.dedup = self.dedup.model_copy(update=unset)
        if self.dedup.verify_from is not None and self.dedup.verify_from >= self.dedup.threshold:
            raise ValueError(
                f"dedup.verify_from ({self.dedup.verify_from}) must be below dedup.threshold "
                f"({self.dedup.threshold}): it is the low end of the band of pairs the pixel verifier checks"
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> JobSpec:
        names = [s.name for s in self.seeds] + [e.name for e in self.eval_sets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"seeds/eval_sets names must be unique, repeated: {dup}")
        if not self.seeds and self.sampling.target_size == 0:
            raise ValueError("nothing to curate: give seeds, or sampling.target_size > 0")
        return self

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): what a stage's marker is keyed on."""
        data = self.model_dump(mode="json")
        for section, defaults in ADDED_SWITCHED_OFF.items():
            # Fields added after jobs were run, left switched off: such jobs keep their fingerprint.
            if all(data[section].get(k) == v for k, v in defaults.items()):
                for k in defaults:
                    data[section].pop(k, None)
        if sections:
            data = {k: data[k] for k in sections}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Fields added to a section after jobs were run, with their switched-off defaults (see `fingerprint`).
ADDED_SWITCHED_OFF = {
    "dedup": {"verify_from": None, "verify_score": 0.5, "tables": 1},
    "retrieval": {"tables": 1},
}


class JobSpecError(ValueError):
    """A job spec that cannot run; the message names every bad field."""


def _model_in(annotation) -> type[BaseModel] | None:
    """The model class a field holds, through `X | None` and `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _fields_beside(loc: tuple) -> list[str]:
    """The field names a spec allows where `loc` (a pydantic error location) points."""
    model: type[BaseModel] | None = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        elif e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _fields_beside(e["loc"]), n=1)
            msg = f"unknown field (did you mean {close[0]!r}?)" if close else "unknown field"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "invalid job spec:\n" + "\n".join(lines)


def parse_job_spec(data: dict) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise JobSpecError(_format_errors(err)) from None


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec; relative paths in it are taken from the YAML's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise JobSpecError(f"no job spec at {path}: no such file") from None
    except (OSError, yaml.YAMLError) as err:
        raise JobSpecError(f"cannot read job spec {path}: {err}") from None
    if not isinstance(data, dict):
        raise JobSpecError(f"invalid job spec: {path} must hold a mapping at top level")
    spec = parse_job_spec(data)
    return _resolve_paths(spec, path.resolve().parent)


def _resolve(uri: str, base: Path) -> str:
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def _resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    spec.output_dir = _resolve(spec.output_dir, base)
    for src in spec.pool:
        src.uri = _resolve(src.uri, base)
    for s in [*spec.seeds, *spec.eval_sets]:
        for src in s.sources:
            src.uri = _resolve(src.uri, base)
    for m in (spec.embedding.retrieval, spec.embedding.copy_detection):
        if m is not None and m.weights and not m.random_init and "://" not in m.weights:
            m.weights = _resolve(m.weights, base)
    return spec
