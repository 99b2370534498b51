"""Curation at scale on generated data: copy-detection dedup (in memory, and part by part on Ray as
the dedup stage runs it), FAISS k-means vs scikit-learn's MiniBatchKMeans, hierarchical k-means +
balanced sampling.

Data: n x dim float32, L2-normalised, a Gaussian mixture of `components` clusters with Zipf-skewed
sizes (so balancing has something to fix), with copy groups, dense scenes of similar non-duplicates and
near misses planted in it (`make_pool` says how and why). Dedup is scored by group recall, groups
merged with anything else, and near misses merged, at the 0.6 copy threshold.

    .venv/bin/python benchmarks/curation.py            # 1M x 384
    .venv/bin/python benchmarks/curation.py --n 100000
    .venv/bin/python benchmarks/curation.py --n 20000 --parts dedup dedup_parts --shards 2
    .venv/bin/python benchmarks/curation.py --n 1000000 --parts dedup --tables 3 --nprobe 32

Baselines measured in the same run: exact (flat) kNN on a sample of queries, extrapolated to all n;
MiniBatchKMeans with the same k on the same data; a uniform random sample of the balanced sample's
size. Ratios are printed last.

`--parts parts`: the same hierarchy and balanced sample over vector parts, as the cluster and sample
stages run them (passes on Ray tasks with `--fanout ray`, in this process with `local`), checked
equal to the whole-table functions on the same (float16-stored) vectors.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Before FAISS/sklearn load OpenMP: on a shared, oversubscribed machine spinning OpenMP threads
# starve each other (measured 3x slower FAISS k-means at load 8 on 2 cores). Override to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyarrow as pa

from lvd.curation.dedup import dedup_pool
from lvd.curation.kmeans import hierarchical_kmeans, kmeans, kmeans_assign
from lvd.curation.knn import auto_index, exact_knn, normalize, use_gpu
from lvd.curation.sampling import (
    ClusterTree,
    balanced_sample,
    extra_picks,
    leaf_budgets,
    leaf_pick_keys,
    leaf_repeats,
)
from lvd.schemas import layout
from lvd.schemas.job_spec import ClusteringSpec, DedupSpec
from lvd.schemas.tables import IMAGES, embeddings_schema, write_parquet_atomic

PARTS = ("dedup", "dedup_parts", "kmeans", "hier", "parts")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@dataclass
class CopyTruth:
    """What was planted: the copy group of each row (-1: none) and the near-miss pairs."""

    group: np.ndarray
    near_a: np.ndarray
    near_b: np.ndarray


def _at_cosine(x: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows at exactly cosine `cos` to the unit rows of `x`, in random directions."""
    u = rng.standard_normal(x.shape, dtype=np.float32)
    u -= (u * x).sum(1, keepdims=True) * x  # orthogonal to x
    u = normalize(u)
    return normalize(cos[:, None] * x + np.sqrt(1 - cos**2)[:, None] * u)


def make_pool(
    n: int, dim: int, components: int, spread: float, seed: int, *, groups: int, scenes: int, near_misses: int
) -> tuple[np.ndarray, np.ndarray, CopyTruth]:
    """A Zipf Gaussian mixture with copy structure planted in it, as web pools have it:

    - copy groups of 2-6 images: an original and edits of it, each made from the original (re-uploads,
      crops, re-encodes), at cosines to it from just above the 0.6 threshold to near-identical. Two weak
      edits of one original are less alike than each is to it, so they reach each other only through
      the original; a grouping must join them through it. Half the originals sit in dense scenes.
    - dense scenes of 16 similar non-duplicates (the same landmark or product shot by different people):
      pairwise cosines around 0.45, under the threshold, crowding the nearest-neighbour lists.
    - near misses: pairs at cosine 0.50-0.57, just under the threshold, that must stay apart.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, components + 1)
    weights /= weights.sum()
    comp = rng.choice(components, size=n, p=weights)
    centers = normalize(rng.standard_normal((components, dim), dtype=np.float32))
    x = np.empty((n, dim), dtype=np.float32)
    step = 131_072
    for s in range(0, n, step):
        z = rng.standard_normal((min(step, n - s), dim), dtype=np.float32) * (spread / math.sqrt(dim))
        x[s : s + step] = normalize(centers[comp[s : s + step]] + z)

    sizes = rng.integers(2, 7, size=groups)  # members per copy group, original included
    copies = int((sizes - 1).sum())
    order = rng.permutation(n)
    take = iter(np.split(order, np.cumsum([scenes * 16, groups, copies, near_misses, near_misses]))[:-1])
    scene_rows, originals, copy_rows, near_a, near_b = (next(take) for _ in range(5))

    scene_centers = normalize(rng.standard_normal((scenes, dim), dtype=np.float32))
    z = rng.standard_normal((scenes * 16, dim), dtype=np.float32) * (1.1 / math.sqrt(dim))
    x[scene_rows] = normalize(np.repeat(scene_centers, 16, axis=0) + z)  # pairwise cosine ~ 0.45
    originals[: groups // 2] = rng.choice(scene_rows, size=groups // 2, replace=False)

    group = np.full(n, -1, np.int64)
    group[originals] = np.arange(groups)
    source = np.repeat(originals, sizes - 1)
    x[copy_rows] = _at_cosine(x[source], rng.uniform(0.63, 0.99, copies).astype(np.float32), rng)
    group[copy_rows] = group[source]
    x[near_b] = _at_cosine(x[near_a], rng.uniform(0.50, 0.57, near_misses).astype(np.float32), rng)
    return x, comp, CopyTruth(group, near_a, near_b)


def copy_quality(component: np.ndarray, truth: CopyTruth) -> dict:
    """Group recall (groups whose members all share one component), groups merged with anything else,
    and near-miss pairs put in one component."""
    rows = np.flatnonzero(truth.group >= 0)
    g, c = truth.group[rows], component[rows]
    n_groups = int(g.max()) + 1
    comps_per_group = np.array([np.unique(c[g == i]).size for i in range(n_groups)])
    members = np.bincount(g, minlength=n_groups)
    # A group is over-merged when its component holds rows that are not its members.
    comp_size = np.bincount(component)
    over = sum(int(comp_size[c[g == i][0]] > members[i]) for i in np.flatnonzero(comps_per_group == 1))
    return {
        "groups": n_groups,
        "group_recall": float((comps_per_group == 1).mean()),
        "groups_over_merged": over,
        "near_misses": int(truth.near_a.size),
        "near_misses_merged": int((component[truth.near_a] == component[truth.near_b]).sum()),
    }


def bench_dedup(x, truth, args) -> dict:
    n = x.shape[0]
    factory = args.index or auto_index(n, x.shape[1], use_gpu())
    ids = np.arange(n, dtype=np.int64)
    t0, c0 = time.perf_counter(), time.process_time()
    res = dedup_pool(
        ids,
        x,
        k=args.k,
        threshold=0.6,
        index=factory,
        nprobe=args.nprobe,
        exact_below=0,
        chunk_size=65_536,
        tables=args.tables,
    )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    quality = copy_quality(res.component_id, truth)
    # Brute force on a sample: every exact edge above the threshold must join one component.
    rng = np.random.default_rng(1)
    q = np.sort(rng.choice(n, size=args.exact_sample, replace=False))
    t1 = time.perf_counter()
    sims, nbr = exact_knn(x[q], x, args.k + 1)
    exact_per_query = (time.perf_counter() - t1) / q.size
    edge = (sims > 0.6) & (nbr != q[:, None])
    src, dst = np.repeat(q, edge.sum(1)), nbr[edge]
    sample_edge_recall = float((res.component_id[src] == res.component_id[dst]).mean()) if src.size else None
    return {
        "index": factory if args.tables == 1 else f"{args.tables} x {factory}",
        "nprobe": args.nprobe,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load": os.getloadavg()[0],
        "peak_rss_gib": peak_rss_gib(),
        "copy_dropped": res.counts()["copy"],
        "edges": res.copy_edges,
        **quality,
        "sample_exact_edges": int(src.size),
        "sample_edge_recall": sample_edge_recall,
        "ivf_recall": res.ivf_recall,
        "exact_seconds_extrapolated": exact_per_query * n,
    }


def write_pool_parts(x: np.ndarray, out, n_parts: int) -> None:
    """The pool as the embed stage leaves it: ingest parts and their embed parts (float16 vectors);
    image i has id i + 1 and sits in part i % n_parts."""
    n, dim = x.shape
    for p in range(n_parts):
        rows = np.arange(p, n, n_parts)
        ids = pa.array(rows + 1, pa.int64())
        text = pa.array([f"p{r}" for r in rows])
        images = pa.table(
            {
                "image_id": ids,
                "dataset": pa.array(["pool"] * rows.size),
                "uri": text,
                "kind": pa.array(["file"] * rows.size),
                "path": text,
                "member": pa.nulls(rows.size, pa.string()),
                "offset": pa.nulls(rows.size, pa.int64()),
                "size": pa.nulls(rows.size, pa.int64()),
                "sha256": pa.array([f"{r:064x}" for r in rows]),
                "width": pa.array(np.full(rows.size, 64, np.int32)),
                "height": pa.array(np.full(rows.size, 64, np.int32)),
                "format": pa.array(["png"] * rows.size),
                "status": pa.array(["ok"] * rows.size),
                "error": pa.nulls(rows.size, pa.string()),
                "note": pa.nulls(rows.size, pa.string()),
            }
        )
        write_parquet_atomic(images, layout.table_part(out, layout.IMAGES, p), IMAGES)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].astype(np.float16).ravel()), dim)
        emb = pa.table(
            {
                "image_id": ids,
                "model": pa.array(["retrieval"] * rows.size),
                "vector": vec,
                "error": pa.nulls(rows.size, pa.string()),
            }
        )
        write_parquet_atomic(
            emb, layout.table_part(out, layout.EMBEDDINGS, p, "retrieval"), embeddings_schema(dim)
        )


def bench_dedup_parts(x, truth, args) -> dict:
    """The dedup stage's path: parts written to disk, the kNN on shard actors, edges from the
    workers; the driver's own peak RSS (VmHWM) is read before and after."""
    import shutil
    import tempfile

    from lvd.jobs.engines import LOOPBACK, local_ray_env

    local_ray_env()  # before Ray is imported: it reads the settings then
    import ray

    from lvd.jobs.stages.dedup import dedup_parts

    n = x.shape[0]
    factory = args.index or auto_index(n, x.shape[1], use_gpu())
    root = tempfile.mkdtemp(prefix="lvd-bench-dedup-")
    try:
        out = layout.stage_dir(root, "out")
        write_pool_parts(x, out, args.num_parts)
        if not ray.is_initialized():  # a Ray of our own on loopback, as a local run
            ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False)
        spec = DedupSpec(
            k=args.k,
            threshold=0.6,
            index=factory,
            nprobe=args.nprobe,
            exact_below=0,
            search_actors=args.shards,
            tables=args.tables,
        )
        hwm_before = driver_hwm_gib()
        t0 = time.perf_counter()
        summary = dedup_parts(
            layout.list_parts(layout.table_dir(out, layout.IMAGES)),
            layout.list_parts(layout.table_dir(out, layout.EMBEDDINGS), "retrieval"),
            [],
            spec,
            out_dir=layout.table_dir(out, layout.DEDUP),
            scratch=lambda name: layout.scratch_dir(layout.stage_dir(out, "dedup"), name),
        )
        seconds = time.perf_counter() - t0
        table = layout.read_table(out, layout.DEDUP, columns=["image_id", "component_id"]).sort_by("image_id")
        component = table["component_id"].to_numpy()
        return {
            "index": factory,
            "nprobe": args.nprobe,
            "shards": summary.shards,
            "parts": args.num_parts,
            "seconds": seconds,
            "copy_dropped": summary.copy,
            "edges": summary.copy_edges,
            **copy_quality(component, truth),
            "ivf_recall": summary.ivf_recall,
            "driver_hwm_before_gib": hwm_before,
            "driver_hwm_after_gib": driver_hwm_gib(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def driver_hwm_gib() -> float:
    """This process's own peak resident memory (VmHWM), not its children's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def parse_kmeans_config(text: str) -> tuple[int, int, str, int]:
    """'cap:niter:assign_dtype[:lloyd_passes]', e.g. '256:20:float32' or '32:10:bfloat16:2'."""
    cap, niter, dtype, *passes = text.split(":")
    return int(cap), int(niter), dtype, int(passes[0]) if passes else 0


def bench_kmeans(x, args) -> dict:
    """Our k-means (FAISS fit on a capped sample, float64 update, assignment of all points) in each
    configuration, against MiniBatchKMeans with sklearn's defaults (it too labels every point)."""
    from sklearn.cluster import MiniBatchKMeans

    k = args.kmeans_k
    ours = {}
    for text in args.kmeans_configs:
        cap, niter, dtype, passes = parse_kmeans_config(text)
        c0, t0 = time.process_time(), time.perf_counter()
        res = kmeans(
            x,
            k,
            niter=niter,
            spherical=False,
            max_points_per_centroid=cap,
            seed=0,
            assign_dtype=dtype,
            lloyd_passes=passes,
        )
        ours[text] = (time.perf_counter() - t0, res.objective, time.process_time() - c0)
        print(f"  ours {text}: {ours[text][0]:.1f} s, objective {ours[text][1]:.1f}", flush=True)
    c0, t0 = time.process_time(), time.perf_counter()
    mbk = MiniBatchKMeans(n_clusters=k, batch_size=args.mb_batch, random_state=0).fit(x)
    mb_s, mb_cpu = time.perf_counter() - t0, time.process_time() - c0
    # Both objectives by the same exact code: squared distance of every point to its nearest centroid.
    _, d_mb = kmeans_assign(
        x, mbk.cluster_centers_.astype(np.float32), spherical=False, assign_dtype="float32"
    )
    return {"k": k, "ours": ours, "minibatch": (mb_s, float(d_mb.astype(np.float64).sum()), mb_cpu)}


def evenness(counts: np.ndarray) -> tuple[float, float]:
    """(normalised entropy of the component histogram, share of the half smallest components)."""
    p = counts / counts.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size)), float(np.sort(p)[: p.size // 2].sum())


def reference_kmeans(x: np.ndarray, k: int, *, niter: int, spherical: bool, seed: int = 0) -> np.ndarray:
    """The quality reference for level 0: k-means++ initialisation on all points, then `niter` full-data
    Lloyd iterations with exact float32 assignment and float64 centroid sums. Slow by design."""
    import scipy.sparse
    from sklearn.cluster import kmeans_plusplus

    centroids, _ = kmeans_plusplus(x, k, random_state=seed)
    centroids = centroids.astype(np.float32)
    n = x.shape[0]
    for _ in range(niter):
        labels, _ = kmeans_assign(x, centroids, spherical=spherical, assign_dtype="float32")
        sums = np.zeros((k, x.shape[1]), np.float64)
        for s in range(0, n, 131_072):  # float64 sums in chunks: no n x d float64 copy
            rows = slice(s, min(n, s + 131_072))
            m = labels[rows].size
            onehot = scipy.sparse.csr_matrix((np.ones(m), (labels[rows], np.arange(m))), shape=(k, m))
            sums += onehot @ x[rows].astype(np.float64)
        counts = np.bincount(labels, minlength=k)
        keep = counts > 0  # an empty cluster keeps its centroid
        new = sums[keep] / counts[keep, None]
        if spherical:
            new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        centroids[keep] = new.astype(np.float32)
    return centroids


def objective(x: np.ndarray, centroids: np.ndarray, spherical: bool) -> float:
    """Sum over points of the distance to the nearest centroid, by the same exact float32 code for
    every method compared."""
    _, dist = kmeans_assign(x, centroids, spherical=spherical, assign_dtype="float32")
    return float(dist.astype(np.float64).sum())


def bench_hierarchy(x, comp, args) -> dict:
    n = x.shape[0]
    levels = [(args.leaf_k, 0), (max(2, args.leaf_k // 10), 2), (max(2, args.leaf_k // 50), 2)]
    t0 = time.perf_counter()
    spec = ClusteringSpec()  # the job spec's defaults

    def hierarchy(passes: int):
        return hierarchical_kmeans(
            x,
            levels,
            niter=spec.niter,
            spherical=True,
            max_points_per_centroid=spec.max_points_per_centroid,
            seed=0,
            lloyd_passes=passes,
        )

    hier = hierarchy(spec.lloyd_passes)
    seconds = time.perf_counter() - t0
    variants = {}  # other numbers of level-0 Lloyd passes: (seconds, level-0 centroids)
    for passes in args.hier_lloyd_passes:
        t1 = time.perf_counter()
        variants[passes] = (0.0, hierarchy(passes).centroids[0])
        variants[passes] = (time.perf_counter() - t1, variants[passes][1])
    ref = None
    if args.reference_iters:
        t0 = time.perf_counter()
        ref_centroids = reference_kmeans(x, args.leaf_k, niter=args.reference_iters, spherical=True)
        ref = {
            "seconds": time.perf_counter() - t0,
            "objective": objective(x, ref_centroids, True),
            "lvd_objective": objective(x, hier.centroids[0], True),
            "variants": {p: (sec, objective(x, c, True)) for p, (sec, c) in variants.items()},
        }
    target = n // 10
    t0 = time.perf_counter()
    rows, reps = balanced_sample(hier.labels, target, seed=0)
    sample_s = time.perf_counter() - t0
    c = comp.max() + 1
    bal = np.bincount(comp[rows], weights=reps, minlength=c)
    rnd = np.bincount(comp[np.random.default_rng(0).choice(n, size=target, replace=False)], minlength=c)
    (hb, sb), (hr, sr) = evenness(bal), evenness(rnd)
    return {
        "levels": hier.ks,
        "seconds": seconds,
        "sample_seconds": sample_s,
        "target": target,
        "drawn": int(reps.sum()),
        "balanced_entropy": hb,
        "random_entropy": hr,
        "balanced_small_half_share": sb,
        "random_small_half_share": sr,
        "components_hit_balanced": int((bal > 0).sum()),
        "components_hit_random": int((rnd > 0).sum()),
        "reference": ref,
    }


def _write_vector_parts(folder: Path, x: np.ndarray, ids: np.ndarray, parts: int) -> list[Path]:
    import pyarrow as pa

    from lvd.schemas import layout
    from lvd.schemas.tables import embeddings_schema, write_parquet_atomic

    paths = []
    for i, rows in enumerate(np.array_split(np.arange(x.shape[0]), parts)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel().astype(np.float16)), x.shape[1])
        table = pa.table(
            {
                "image_id": ids[rows],
                "model": ["retrieval"] * rows.size,
                "vector": vec,
                "error": [None] * rows.size,
            },
            schema=embeddings_schema(x.shape[1]),
        )
        paths.append(layout.part_path(folder, i, "retrieval"))
        write_parquet_atomic(table, paths[-1], table.schema)
    return paths


def _leaf_pick_rows(label_part: Path):
    from lvd.curation.cluster_labels import read_labels

    ids, leaf, _ = read_labels(label_part)
    return leaf, leaf_pick_keys(ids, 0), ids


def bench_parts(x, args) -> dict:
    """Hierarchical k-means and the balanced sample over parts against the whole-table functions."""
    from lvd.curation.cluster_labels import read_labels
    from lvd.curation.kmeans import level_labels
    from lvd.curation.stage_io import load_vectors
    from lvd.jobs.kmeans_parts import hierarchical_kmeans_over_parts, kept_pool_parts
    from lvd.jobs.selection import select_smallest
    from lvd.jobs.workers import LocalFanout, RayFanout

    n = x.shape[0]
    levels = [(args.leaf_k, 0), (max(2, args.leaf_k // 10), 2), (max(2, args.leaf_k // 50), 2)]
    ids = np.random.default_rng(2).choice(2**62, n, replace=False).astype(np.int64)
    if args.fanout == "ray":
        from lvd.jobs.engines import LOOPBACK, local_ray_env

        local_ray_env()
        import ray

        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            num_cpus=args.ray_cpus,
            include_dashboard=False,
            log_to_driver=False,
        )
    fanout = RayFanout() if args.fanout == "ray" else LocalFanout()
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_vector_parts(Path(tmp) / "embed", x, ids, args.num_parts)
        ref_ids, ref_x = load_vectors(paths, "retrieval", ids)
        t0 = time.perf_counter()
        ref = hierarchical_kmeans(ref_x, levels, niter=20, spherical=True, seed=0, ids=ref_ids)
        whole_s = time.perf_counter() - t0
        del ref_x
        t0 = time.perf_counter()
        parts, counts = kept_pool_parts(paths, None, fanout=fanout)
        hier = hierarchical_kmeans_over_parts(
            parts,
            levels,
            Path(tmp) / "labels",
            n=sum(counts),
            niter=20,
            spherical=True,
            seed=0,
            fanout=fanout,
        )
        parts_s = time.perf_counter() - t0
        got = [read_labels(p) for p in hier.label_parts]
        got_ids = np.concatenate([g[0] for g in got])
        order = np.argsort(got_ids)
        labels = level_labels(np.concatenate([g[1] for g in got])[order], hier.parents)
        same_labels = bool(np.array_equal(labels, ref.labels)) and bool(
            np.array_equal(got_ids[order], ref_ids)
        )
        same_centroids = all(np.array_equal(a, b) for a, b in zip(hier.centroids, ref.centroids, strict=True))

        # The balanced sample: trees and repeats per label part, the leaf pick by cutoffs over parts.
        target = n // 10
        rows, reps = balanced_sample(ref.labels, target, seed=0, ids=ref_ids)
        want = np.zeros(n, np.int64)
        want[rows] = reps
        t0 = time.perf_counter()
        part_labels = [(g[0], level_labels(g[1], hier.parents)) for g in got]
        tree = functools.reduce(ClusterTree.merge, [ClusterTree.of_labels(lab) for _, lab in part_labels])
        budget = leaf_budgets(tree, target, 1)
        extra = select_smallest(  # in this process: the loader is this script's (Ray would not find it)
            hier.label_parts,
            _leaf_pick_rows,
            tree.sizes[0],
            extra_picks(budget, tree.sizes[0]),
            0.0,
            1.0,
            name="leaf pick",
            fanout=LocalFanout(),
        )
        got_rep = np.concatenate(
            [leaf_repeats(lab[:, 0], i, budget, tree.sizes[0], extra, 0) for i, lab in part_labels]
        )[order]
        sample_s = time.perf_counter() - t0
    if args.fanout == "ray":
        ray.shutdown()
    return {
        "levels": hier.ks,
        "whole_seconds": whole_s,
        "parts_seconds": parts_s,
        "sample_seconds": sample_s,
        "same_labels": same_labels,
        "same_centroids": same_centroids,
        "same_sample": bool(np.array_equal(got_rep, want)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--components", type=int, default=100)
    ap.add_argument("--groups", type=int, default=None, help="planted copy groups (default n / 100)")
    ap.add_argument("--spread", type=float, default=1.5, help="norm of the within-component noise")
    ap.add_argument("--k", type=int, default=64, help="neighbours per image in the copy graph")
    ap.add_argument(
        "--index",
        default=None,
        help="FAISS factory string (default IVF<2*sqrt(n)>,PQ64x4fs,RFlat: 4-bit fast-scan PQ, re-ranked exactly)",
    )
    ap.add_argument("--nprobe", type=int, default=64)
    ap.add_argument("--tables", type=int, default=1, help="IVF partitions searched together (dedup.tables)")
    ap.add_argument("--exact-sample", type=int, default=1000)
    ap.add_argument("--kmeans-k", type=int, default=1000)
    ap.add_argument(
        "--kmeans-configs",
        nargs="+",
        default=[
            "256:20:float32",
            "256:20:bfloat16",
            "32:20:bfloat16",
            "32:10:bfloat16",
            "32:6:float32",
            "32:6:bfloat16",
        ],
        help="cap:niter:assign_dtype[:lloyd_passes] (max points per centroid in the fit, its Lloyd "
        "iterations, precision of the assignment passes, full-data Lloyd passes after the fit); the job "
        "spec's defaults are printed",
    )
    ap.add_argument("--mb-batch", type=int, default=1024, help="MiniBatchKMeans batch size (its default)")
    ap.add_argument("--leaf-k", type=int, default=1000)
    ap.add_argument(
        "--reference-iters",
        type=int,
        default=50,
        help="hier: Lloyd iterations of the level-0 quality reference (k-means++ init; 0 skips it)",
    )
    ap.add_argument(
        "--hier-lloyd-passes",
        type=int,
        nargs="*",
        default=[],
        help="hier: also time the hierarchy with these numbers of level-0 full-data Lloyd passes and "
        "compare each with the reference (the spec's default is always run)",
    )
    ap.add_argument(
        "--num-parts", type=int, default=8, help="dedup_parts / parts: parts the pool is written in"
    )
    ap.add_argument("--shards", type=int, default=2, help="dedup_parts: kNN shard actors")
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=["dedup", "kmeans", "hier", "parts"],
        help="which benchmarks to run (dedup_parts: the dedup stage's path on local Ray, on request)",
    )
    ap.add_argument(
        "--fanout", choices=("ray", "local"), default="ray", help="passes of the `parts` benchmark"
    )
    ap.add_argument("--ray-cpus", type=int, default=2)
    args = ap.parse_args()
    groups = args.groups if args.groups is not None else args.n // 100

    t0 = time.perf_counter()
    x, comp, truth = make_pool(
        args.n,
        args.dim,
        args.components,
        args.spread,
        seed=0,
        groups=groups,
        scenes=args.n // 200,
        near_misses=args.n // 200,
    )
    print(
        f"data: {args.n} x {args.dim}, {args.components} components (Zipf sizes), {groups} copy groups of "
        f"2-6 ({int((truth.group >= 0).sum())} images), {args.n // 200} dense scenes of 16, "
        f"{args.n // 200} near-miss pairs; generated in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    d = bench_dedup(x, truth, args) if "dedup" in args.parts else None
    if d:
        print(
            f"copy dedup ({d['index']}, nprobe {d['nprobe']}, k {args.k}): {d['seconds']:.1f} s "
            f"({d['cpu_seconds']:.0f} CPU-s on {os.cpu_count()} cores, load {d['load']:.1f}), "
            f"peak RSS {d['peak_rss_gib']:.2f} GiB, {d['edges']} edges, {d['copy_dropped']} dropped",
            flush=True,
        )
        print(
            f"  group recall {d['group_recall']:.4f} of {d['groups']}, groups over-merged "
            f"{d['groups_over_merged']}, near misses merged {d['near_misses_merged']} of {d['near_misses']}; "
            f"exact edges in a {args.exact_sample}-query sample: "
            f"{d['sample_exact_edges']}, joined: {d['sample_edge_recall']}; IVF edge recall {d['ivf_recall']}",
            flush=True,
        )
        print(
            f"  exact flat search extrapolated to all {args.n} queries: {d['exact_seconds_extrapolated']:.0f} s",
            flush=True,
        )

    dp = bench_dedup_parts(x, truth, args) if "dedup_parts" in args.parts else None
    if dp:
        print(
            f"copy dedup part by part ({dp['index']}, nprobe {dp['nprobe']}, {dp['parts']} parts, "
            f"{dp['shards']} shard actors): {dp['seconds']:.1f} s, {dp['edges']} edges, {dp['copy_dropped']} dropped, "
            f"group recall {dp['group_recall']:.4f}, near misses merged {dp['near_misses_merged']}, IVF edge recall {dp['ivf_recall']}; driver VmHWM "
            f"{dp['driver_hwm_before_gib']:.2f} -> {dp['driver_hwm_after_gib']:.2f} GiB (the generated pool included)",
            flush=True,
        )

    spec = ClusteringSpec()
    print(
        f"job spec defaults: {spec.max_points_per_centroid}:{spec.niter}:{spec.assign_dtype}:{spec.lloyd_passes}",
        flush=True,
    )
    km = bench_kmeans(x, args) if "kmeans" in args.parts else None
    if km:
        mb_s, mb_obj, mb_cpu = km["minibatch"]
        print(
            f"k-means k={km['k']}: MiniBatchKMeans {mb_s:.1f} s objective {mb_obj:.1f}",
            flush=True,
        )
        for text, (sec, obj, _) in km["ours"].items():
            cap, niter, dtype, passes = parse_kmeans_config(text)
            print(
                f"  FAISS fit on <= {cap} points/centroid, {niter} iterations, {passes} full Lloyd passes, "
                f"{dtype} assignment: {sec:.1f} s "
                f"objective {obj:.1f}",
                flush=True,
            )

    h = bench_hierarchy(x, comp, args) if "hier" in args.parts else None
    if h:
        print(
            f"hierarchical k-means {h['levels']}: {h['seconds']:.1f} s; balanced sample of {h['target']} "
            f"(drew {h['drawn']}) in {h['sample_seconds']:.2f} s",
            flush=True,
        )
        print(
            f"  component coverage, balanced vs random: normalised entropy {h['balanced_entropy']:.3f} vs "
            f"{h['random_entropy']:.3f}; share of the smaller half of components {h['balanced_small_half_share']:.3f} "
            f"vs {h['random_small_half_share']:.3f} (uniform 0.5); components hit {h['components_hit_balanced']} vs "
            f"{h['components_hit_random']}",
            flush=True,
        )

    pp = bench_parts(x, args) if "parts" in args.parts else None
    if pp:
        print(
            f"over {args.num_parts} parts ({args.fanout}): hierarchical k-means {pp['levels']} "
            f"{pp['parts_seconds']:.1f} s (whole table {pp['whole_seconds']:.1f} s); balanced sample "
            f"{pp['sample_seconds']:.2f} s; equal to the whole table: labels {pp['same_labels']}, "
            f"centroids {pp['same_centroids']}, sample {pp['same_sample']}",
            flush=True,
        )

    print(
        f"peak RSS of the whole run: {peak_rss_gib():.2f} GiB; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )

    print(
        "\nratios (targets at 1M: dedup <= 60 s, group recall >= 0.995, no near miss merged, peak < 8 GiB, "
        "k-means >= 10x):"
    )
    if d:
        speedup = d["exact_seconds_extrapolated"] / d["seconds"]
        print(f"  copy-dedup speed-up vs exact flat search (extrapolated): {speedup:.1f}x")
        print(f"  copy-dedup seconds / 60 s target: {d['seconds'] / 60:.3f}")
        print(f"  group recall: {d['group_recall']:.4f}; near misses merged: {d['near_misses_merged']}")
        print(f"  peak RSS / 8 GiB: {d['peak_rss_gib'] / 8:.3f}")
    if km:
        # CPU seconds (this process, all threads) as well: on a shared machine the wall-clock ratio
        # also measures how the load moved between the runs.
        for text, (sec, obj, cpu) in km["ours"].items():
            print(
                f"  k-means {text} vs MiniBatchKMeans: {mb_s / sec:.1f}x faster ({mb_cpu / cpu:.1f}x less CPU), "
                f"objective ratio {obj / mb_obj:.4f} (<= 1 is no worse)"
            )
    if h:
        print(
            f"  balanced / random normalised entropy of components: {h['balanced_entropy'] / h['random_entropy']:.3f}"
        )
        small = h["balanced_small_half_share"] / max(h["random_small_half_share"], 1e-12)
        print(f"  balanced / random share of the smaller half of components: {small:.2f}x")
        if h["reference"]:
            r = h["reference"]
            print(
                f"  hierarchical level-0 objective / reference (k-means++, {args.reference_iters} full Lloyd "
                f"iterations): {r['lvd_objective'] / r['objective']:.4f} (target <= 1.01); whole hierarchy "
                f"{r['seconds'] / h['seconds']:.1f}x faster than the reference's level 0 alone (target >= 5x)"
            )
            for passes, (sec, obj) in r["variants"].items():
                print(
                    f"  with {passes} level-0 Lloyd passes: objective / reference {obj / r['objective']:.4f}, "
                    f"{r['seconds'] / sec:.1f}x faster than the reference"
                )


if __name__ == "__main__":
    main()
