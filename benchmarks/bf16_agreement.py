"""bf16 vs fp32 embeddings: do the dedup and cluster decisions agree, image by image?

Two pools, each embedded twice by the same models, at `precision: float32` and at the default
`precision: auto` (bf16 on a CPU with native bf16, except for the copy descriptor), through
the embed stage's decoding and model loading, on the CPU:
- demo: the images `lvd demo` generates (`jobs.demo`), with the demo job's retrieval and
  copy-detection model specs, dedup threshold and cluster levels;
- real: the real-image copy corpus (`jobs.copy_corpus`, photos and drawings that installed packages
  ship, with planted copies), with the built-in copy descriptor at its threshold and the demo's
  retrieval model spec.

Decisions compared, per image:
- dedup: kept or dropped (`curation.dedup.dedup_pool` on each precision's copy-detection vectors);
- cluster, same centroids: the level-0 cluster of the bf16 vector under the fp32 run's centroids
  equals its fp32 label (what the precision changes when the clustering is given);
- cluster, rerun: hierarchical k-means rerun on the bf16 vectors (same seed and ids), its level-0
  labels matched one to one to the fp32 run's clusters (the largest overlap), the share that agree.
  A rerun can move a centroid and with it many images whose vectors barely moved: this is the
  harshest reading, printed beside the first.

Target: >= 99.5 % of images agree on dedup and on cluster (same centroids) on both pools.
Run: .venv/bin/python benchmarks/bf16_agreement.py [--demo-images 600] [--corpus-seeds 0 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from lvd.curation.dedup import dedup_pool
from lvd.curation.kmeans import hierarchical_kmeans, kmeans_assign
from lvd.embeddings import copy_descriptor
from lvd.embeddings.hardware import cpu_has_native_bf16
from lvd.embeddings.models import load_embedding_model
from lvd.embeddings.preprocess import ImageDecodeError, prepare_image
from lvd.jobs import demo
from lvd.jobs.copy_corpus import build_copy_corpus
from lvd.schemas.job_spec import ClusteringSpec, DedupSpec, ModelSpec

PRECISIONS = ("float32", "auto")


def embed_bytes(blobs: list[bytes], spec: ModelSpec, batch_size: int = 32) -> np.ndarray:
    """Unit vectors of `blobs` by `spec` on the CPU, as the embed stage decodes and runs them."""
    model = load_embedding_model(spec, "cpu")
    out = []
    for start in range(0, len(blobs), batch_size):
        batch = np.stack([prepare_image(b, model.preprocess) for b in blobs[start : start + batch_size]])
        out.append(model.embed_uint8(batch))
    return np.concatenate(out)


def decodable(blobs: list[bytes], spec: ModelSpec) -> list[bytes]:
    """The blobs the embed stage can decode (the demo plants undecodable files on purpose)."""
    cfg = load_embedding_model(spec, "cpu").preprocess
    ok = []
    for b in blobs:
        try:
            prepare_image(b, cfg)
        except (ImageDecodeError, OSError, ValueError):
            continue
        ok.append(b)
    return ok


def matched_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of images whose label in `b` is the one-to-one match (largest total overlap) of their label in `a`."""
    ka, kb = a.max() + 1, b.max() + 1
    table = np.zeros((ka, kb), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / a.size)


def compare(
    name: str,
    blobs: list[bytes],
    copy_spec: ModelSpec,
    retrieval_spec: ModelSpec,
    threshold: float,
    levels: list[tuple[int, int]],
    dedup_spec: DedupSpec,
    copy_auto: str = "auto",
) -> dict:
    vectors = {}
    for precision in PRECISIONS:
        t0 = time.perf_counter()
        vectors[precision] = (
            embed_bytes(
                blobs,
                copy_spec.model_copy(update={"precision": copy_auto if precision == "auto" else precision}),
            ),
            embed_bytes(blobs, retrieval_spec.model_copy(update={"precision": precision})),
        )
        print(
            f"  {name}: embedded {len(blobs)} images twice in {precision}: {time.perf_counter() - t0:.1f} s"
        )
    ids = np.arange(len(blobs), dtype=np.int64)
    keep, cos = {}, {}
    for precision, (copy_vectors, _) in vectors.items():
        res = dedup_pool(
            ids,
            copy_vectors,
            k=min(dedup_spec.k, len(blobs) - 1),
            threshold=threshold,
            grouping=dedup_spec.grouping,
        )
        keep[precision] = res.keep
    for i, kind in enumerate(("copy", "retrieval")):
        cos[kind] = float((vectors["float32"][i] * vectors["auto"][i]).sum(1).min())
    spec = ClusteringSpec()
    runs = {
        precision: hierarchical_kmeans(
            retrieval,
            levels,
            niter=spec.niter,
            max_points_per_centroid=spec.max_points_per_centroid,
            seed=0,
            ids=ids,
        )
        for precision, (_, retrieval) in vectors.items()
    }
    fp32_labels = runs["float32"].labels[:, 0]
    same_centroids, _ = kmeans_assign(
        vectors["auto"][1], runs["float32"].centroids[0], spherical=True, assign_dtype="float32"
    )
    fp32_again, _ = kmeans_assign(
        vectors["float32"][1], runs["float32"].centroids[0], spherical=True, assign_dtype="float32"
    )
    return {
        "images": len(blobs),
        "min_cosine": cos,
        "dedup_dropped": {p: int((~k).sum()) for p, k in keep.items()},
        "dedup_agree": float((keep["float32"] == keep["auto"]).mean()),
        "cluster_same_centroids": float((same_centroids == fp32_again).mean()),
        "cluster_rerun": [
            matched_agreement(runs["float32"].labels[:, lv], runs["auto"].labels[:, lv])
            for lv in range(len(levels))
        ],
        "levels": runs["float32"].ks,
        "fp32_labels_check": float((fp32_again == fp32_labels).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-images", type=int, default=600)
    ap.add_argument("--corpus-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--copy-precision",
        default="auto",
        choices=PRECISIONS + ("bfloat16",),
        help="precision the copy descriptor runs at on the real pool in place of auto (bfloat16: what auto avoids)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"CPU has native bf16: {cpu_has_native_bf16()}; load {os.getloadavg()[0]:.1f}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="lvd-bf16-") as tmp:
        root = Path(tmp)
        job = demo._job_spec(32)
        (root / "data").mkdir()
        demo.write_copy_detection_model(root / "data" / "copy_detection.pt", 0)

        def model_spec(d: dict) -> ModelSpec:
            d = dict(d)
            if d.get("weights") not in (None, "random") and not Path(d["weights"]).is_absolute():
                d["weights"] = str(root / d["weights"])
            return ModelSpec(**d)

        retrieval = model_spec(job["embedding"]["retrieval"])
        copy_demo = model_spec(job["embedding"]["copy_detection"])
        dedup_spec = DedupSpec(**job.get("dedup", {}))
        demo_levels = [(lv["k"], lv.get("resampling_steps", 0)) for lv in job["clustering"]["levels"]]

        items, _ = demo._generate_pool(np.random.default_rng(0), args.demo_images)
        blobs = decodable([it["data"] for it in items], retrieval)
        results["demo"] = compare(
            "demo", blobs, copy_demo, retrieval, dedup_spec.threshold, demo_levels, dedup_spec
        )

        real = []
        for seed in args.corpus_seeds:
            real += [im.data for im in build_copy_corpus(seed).images]
        n = len(real)
        real_levels = [(max(2, n // 25), 0), (max(2, n // 100), 2)]
        results["real"] = compare(
            "real",
            real,
            ModelSpec(arch="copy_descriptor"),
            retrieval,
            copy_descriptor.THRESHOLD,
            real_levels,
            dedup_spec,
            copy_auto=args.copy_precision,
        )

    print(
        f"\nload {os.getloadavg()[0]:.1f}; agreement of auto (bf16) with fp32, per image (target >= 0.995):"
    )
    for name, r in results.items():
        print(
            f"  {name}: {r['images']} images; min cosine fp32 vs auto: copy {r['min_cosine']['copy']:.5f}, "
            f"retrieval {r['min_cosine']['retrieval']:.5f}; dropped by dedup fp32 {r['dedup_dropped']['float32']}, "
            f"auto {r['dedup_dropped']['auto']}"
        )
        print(f"    dedup decisions agree: {r['dedup_agree']:.4f}")
        print(f"    cluster (level 0 of {r['levels']}), same centroids: {r['cluster_same_centroids']:.4f}")
        print(
            "    cluster, rerun on auto vectors, matched per level: "
            + ", ".join(f"level {lv} {a:.4f}" for lv, a in enumerate(r["cluster_rerun"]))
        )


if __name__ == "__main__":
    main()
