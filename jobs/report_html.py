"""The HTML report of a job (`<output_dir>/report.html`): one static file, readable offline, with the
funnel, dedup, clusters, retrieval and output sections, thumbnails and plots embedded as data URIs.

It samples: workers read the DECISIONS, RETRIEVED and shard parts and return bounded aggregates
(per-bin counts, per-cluster counts, the few rows with the smallest keyed draw); thumbnails are made
by workers for the few hundred images shown. Only the plots and the HTML are made on the driver.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lvd.curation import decisions as dec
from lvd.curation.knn_sharded import VectorPart, read_vector_part
from lvd.curation.seeded import keyed_uniform
from lvd.curation.stage_io import copy_detection_model
from lvd.jobs.workers import run_tasks
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec

log = logging.getLogger("lvd")

REPORT_STREAM = 11  # keyed-draw stream of the report's samples (independent of the job's draws)
THUMB = 96  # thumbnail side, pixels
PER_BIN = 3  # example pairs per similarity bin
TOP_COMPONENTS = 5
COMPONENT_STRIP = 10  # members shown per component
SAMPLE_CLUSTERS = 4
PER_CLUSTER = 4  # closest / random / farthest members shown per sampled cluster
SEEDS_SHOWN = 4
EVAL_SHOWN = 8
OUTPUT_GRID = 24
MAX_CLUSTER_ROWS = 20  # clusters listed per cluster-based seed set
OUTPUT_SHARDS = 3  # shards read back for the grid
NEAR_MISS_SAMPLE = 2000  # kept images whose nearest neighbours (within the sample) give the pairs below
NEAR_MISS_PARTS = 4

SECTIONS = ("funnel", "dedup", "clusters", "retrieval", "output")


def draw(ids: np.ndarray) -> np.ndarray:
    return keyed_uniform(np.asarray(ids, dtype=np.int64), 0, REPORT_STREAM)


def smallest(table: pa.Table, n: int, key: str = "image_id") -> pa.Table:
    """The n rows with the smallest keyed draw of `key` (a sample that any split of rows agrees on)."""
    if table.num_rows <= n:
        return table
    d = draw(table[key].to_numpy())
    return table.take(pa.array(np.argsort(d, kind="stable")[:n]))


def sim_bins(threshold: float) -> np.ndarray:
    return np.round(np.arange(threshold - 0.2, threshold + 0.2001, 0.05), 4)


# ---------------------------------------------------------------- worker passes


@dataclass
class PartStats:
    """What one DECISIONS part gives the report (every field bounded, whatever the part's size)."""

    component_counts: Counter = field(default_factory=Counter)  # component_id -> other members
    pair_counts: np.ndarray | None = None  # duplicates per similarity bin
    pairs: list[dict] = field(default_factory=list)  # a few per bin
    evals: list[dict] = field(default_factory=list)
    after: list[np.ndarray] = field(default_factory=list)  # output samples per cluster, per level
    members: list[dict] = field(default_factory=list)  # sampled clusters' closest/random/farthest
    cluster_retrieved: dict = field(default_factory=dict)  # seed set -> Counter(level-0 cluster)
    cluster_examples: list[dict] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)


def part_stats(path: Path, *, bins: np.ndarray, level_sizes: list[int], clusters: list[int]) -> PartStats:
    t = pq.read_table(path)
    st = PartStats()
    st.outcomes = Counter(f"{s}: {r}" if o == dec.DROPPED else o for o, s, r in zip(
        t["outcome"].to_pylist(), t["stage"].to_pylist(), t["reason"].to_pylist(), strict=True))  # fmt: skip
    ids = t["image_id"].to_numpy()
    in_comp = t["component_id"].is_valid().to_numpy(zero_copy_only=False)
    comp = t["component_id"].fill_null(0).to_numpy()
    other = in_comp & (comp != ids)
    st.component_counts = Counter(comp[other].astype(np.int64).tolist())

    dups = t.filter(t["duplicate_cosine"].is_valid())
    cos = dups["duplicate_cosine"].to_numpy()
    idx = np.clip(np.digitize(cos, bins) - 1, -1, len(bins) - 1)
    st.pair_counts = np.bincount(idx + 1, minlength=len(bins) + 1)
    for b in np.unique(idx):
        rows = smallest(dups.filter(pa.array(idx == b)), PER_BIN)
        st.pairs += [
            {"a": r["image_id"], "b": r["duplicate_of"], "cos": r["duplicate_cosine"], "kind": r["dedup"]}
            for r in rows.select(["image_id", "duplicate_of", "duplicate_cosine", "dedup"]).to_pylist()
        ]
    evals = smallest(t.filter(t["eval_match"].is_valid()), EVAL_SHOWN)
    st.evals = evals.select(["image_id", "eval_match", "eval_cosine"]).to_pylist()

    out = t.filter(pc.and_(pc.equal(t["outcome"], dec.IN_OUTPUT), t["cluster_ids"].is_valid()))
    labels = out["cluster_ids"].combine_chunks().flatten().to_numpy().reshape(out.num_rows, -1)
    repeats = out["repeats"].to_numpy()
    st.after = [
        np.bincount(labels[:, lv], weights=repeats, minlength=k) if labels.shape[1] > lv else np.zeros(k)
        for lv, k in enumerate(level_sizes)
    ]

    clustered = t.filter(t["cluster_ids"].is_valid())
    leaf = pc.list_element(clustered["cluster_ids"], 0).to_numpy() if clustered.num_rows else np.zeros(0)
    cols = ["image_id", "cluster_distance", "cluster_ids"]
    for c in clusters:
        rows = clustered.filter(pa.array(leaf == c)).select(cols)
        if rows.num_rows == 0:
            continue
        by_dist = rows.sort_by("cluster_distance")
        picks = {
            "closest": by_dist.slice(0, PER_CLUSTER),
            "farthest": by_dist.slice(max(0, rows.num_rows - PER_CLUSTER)),
            "random": smallest(rows, PER_CLUSTER),
        }
        for kind, p in picks.items():
            st.members += [{"cluster": c, "kind": kind, **r} for r in p.select(cols[:2]).to_pylist()]

    retrieved = t.filter(pc.greater(pc.list_value_length(t["retrieved_by"]), 0))
    for row in retrieved.select(["image_id", "retrieved_by", "cluster_ids"]).to_pylist():
        for r in row["retrieved_by"]:
            if r["strategy"] == "cluster":
                c = row["cluster_ids"][0] if row["cluster_ids"] else -1
                st.cluster_retrieved.setdefault(r["seed_set"], Counter())[c] += 1
                st.cluster_examples.append(
                    {"seed_set": r["seed_set"], "cluster": c, "image_id": row["image_id"], "rank": r["rank"]}
                )
    # Only a few examples per (seed set, cluster) leave the task: the best-ranked.
    st.cluster_examples.sort(key=lambda e: (e["seed_set"], e["cluster"], e["rank"]))
    kept, seen = [], Counter()
    for e in st.cluster_examples:
        if seen[(e["seed_set"], e["cluster"])] < PER_CLUSTER:
            seen[(e["seed_set"], e["cluster"])] += 1
            kept.append(e)
    st.cluster_examples = kept
    return st


def component_members(path: Path, *, components: np.ndarray) -> list[dict]:
    """Members of the given components in one DECISIONS part (at most COMPONENT_STRIP each)."""
    t = pq.read_table(path, columns=["image_id", "component_id", "dedup", "duplicate_cosine"])
    t = t.filter(pc.is_in(t["component_id"], pa.array(components)))
    t = t.sort_by([("component_id", "ascending"), ("image_id", "ascending")])
    out, seen = [], Counter()
    for r in t.to_pylist():
        if seen[r["component_id"]] < COMPONENT_STRIP:
            seen[r["component_id"]] += 1
            out.append(r)
    return out


def seed_examples(path: Path, *, seed_set: str) -> list[dict]:
    """A RETRIEVED part's rows of its SEEDS_SHOWN seeds with the smallest keyed draw (a seed image's
    rows are all in its query part)."""
    t = pq.read_table(path).filter(pc.field("seed_set") == seed_set)
    t = t.filter(t["seed_id"].is_valid())
    if t.num_rows == 0:
        return []
    seeds = np.unique(t["seed_id"].to_numpy())
    chosen = seeds[np.argsort(draw(seeds), kind="stable")[:SEEDS_SHOWN]]
    return t.filter(pc.is_in(t["seed_id"], pa.array(chosen))).to_pylist()


def dataset_sample(path: Path, *, datasets: list[str], n: int) -> list[dict]:
    """Up to n ok images per dataset of one ingest part, by smallest keyed draw."""
    t = ds.dataset(path, format="parquet").to_table(
        columns=["image_id", "dataset"],
        filter=pc.field("dataset").isin(datasets) & (pc.field("status") == "ok"),
    )
    out = []
    for name in datasets:
        out += smallest(t.filter(pc.field("dataset") == name), n).to_pylist()
    return out


def near_miss_vectors(part: VectorPart, *, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    ids, vectors = read_vector_part(part)
    keep = draw(ids) < fraction
    return ids[keep], vectors[keep]


def seed_cluster_counts(query: VectorPart, *, centroids: np.ndarray, spherical: bool) -> np.ndarray:
    """Seed images of one part per level-0 cluster, assigned as the retrieve stage assigns them."""
    from lvd.curation.kmeans import kmeans_assign

    _, vectors = read_vector_part(query)
    if vectors.shape[0] == 0:
        return np.zeros(centroids.shape[0], np.int64)
    labels, _ = kmeans_assign(vectors, centroids, spherical=spherical)
    return np.bincount(labels, minlength=centroids.shape[0])


def shard_stats(path: Path) -> tuple[Counter, int, list[dict]]:
    """(samples per source, samples, the OUTPUT_GRID samples with the smallest keyed draw of key)."""
    t = pq.read_table(path, columns=["key", "image_id", "shard", "sources"])
    sources = Counter(pc.list_flatten(t["sources"]).to_pylist())
    keys = t["key"].to_pylist()
    d = keyed_uniform(np.array([hash_key(k) for k in keys], dtype=np.int64), 0, REPORT_STREAM)
    order = np.argsort(d, kind="stable")[:OUTPUT_GRID]
    return sources, t.num_rows, t.take(pa.array(order)).select(["key", "image_id", "shard"]).to_pylist()


def hash_key(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def thumbnail(data: bytes) -> str | None:
    """A JPEG data URI of the image scaled to fit THUMB x THUMB, None when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB * 2, THUMB * 2))
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=75)
    except Exception:  # any undecodable image: the report shows a placeholder
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnails_of_part(path: Path, *, ids: np.ndarray) -> dict[int, dict]:
    """Thumbnails (and uri, dataset) of the wanted images found in one ingest part."""
    from lvd.curation.image_io import read_image_bytes

    t = ds.dataset(path, format="parquet").to_table(
        columns=["image_id", "uri", "dataset", "kind", "path", "member", "offset", "size"],
        filter=pc.field("image_id").isin(ids),
    )
    out = {}
    for r in t.to_pylist():
        try:
            data = read_image_bytes(r["kind"], r["path"], r["member"], r["offset"], r["size"])
            thumb = thumbnail(data)
        except Exception:  # a source gone or unreadable: placeholder
            thumb = None
        out[r["image_id"]] = {"uri": r["uri"], "dataset": r["dataset"], "thumb": thumb}
    return out


def shard_thumbnails(item: tuple[str, list[str]], *, folder: Path) -> dict[str, str | None]:
    """Thumbnails of some samples read back from one shard tar, by key."""
    shard, keys = item
    wanted, out = set(keys), {}
    with tarfile.open(folder / shard) as tar:
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            if key in wanted and ext != "json":
                out[key] = thumbnail(tar.extractfile(member).read())
    return out


# ---------------------------------------------------------------- plots and HTML


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(w: float = 6, h: float = 2.6, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(w, h), squeeze=False)


def _esc(x) -> str:
    return html.escape(str(x))


PLACEHOLDER = (
    "data:image/svg+xml;base64,"
    + base64.b64encode(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{THUMB}" height="{THUMB}">'
        f'<rect width="100%" height="100%" fill="#ddd"/><text x="8" y="52" font-size="11">no preview</text>'
        "</svg>".encode()
    ).decode()
)

CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1200px}
h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.strip{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0 10px}
figure.t{margin:0;width:100px;font-size:10px;text-align:center;word-break:break-all}
figure.t img{width:96px;height:96px;object-fit:contain;background:#f0f0f0;display:block;margin:auto}
.pair{display:inline-flex;gap:2px;border:1px solid #ddd;padding:3px;margin:3px;align-items:flex-end}
.note{color:#666;font-size:90%}
"""


class Page:
    def __init__(self, thumbs: dict[int, dict]):
        self.thumbs = thumbs
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def img(self, image_id: int | None, caption: str = "", thumb: str | None = None) -> str:
        info = self.thumbs.get(image_id, {}) if image_id is not None else {}
        src = thumb or info.get("thumb") or PLACEHOLDER
        title = _esc(info.get("uri", image_id))
        return (
            f'<figure class="t"><img src="{src}" alt="{_esc(image_id)}" title="{title}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )

    def plot(self, uri: str, alt: str) -> None:
        self.add(f'<p><img class="plot" src="{uri}" alt="{_esc(alt)}"></p>')

    def table(self, header: list[str], rows: list[list], left: int = 1) -> None:
        th = "".join(f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(header))
        body = "".join(
            "<tr>"
            + "".join(f'<td class="{"l" if i < left else ""}">{_esc(v)}</td>' for i, v in enumerate(r))
            + "</tr>"
            for r in rows
        )
        self.add(f"<table><tr>{th}</tr>{body}</table>")


def _model_rows(spec: JobSpec, summaries: dict) -> list[list]:
    rows = []
    for role in ("retrieval", "copy_detection"):
        m = getattr(spec.embedding, role)
        if m is None:
            rows.append([role, "(the retrieval model's vectors)", "", ""])
            continue
        if m.arch == "copy_descriptor":  # no weights to load: built in, not a random stand-in
            rows.append([role, m.arch, "built in (no learned weights)", "no"])
            continue
        weights = getattr(m, "weights", None)
        random_init = not weights or str(weights) == "random"
        rows.append([role, m.arch, "random" if random_init else str(weights), "yes" if random_init else "no"])
    return rows


def _rate(count, seconds) -> str:
    return f"{count / seconds:,.0f}" if count and seconds else "-"


# ---------------------------------------------------------------- the report


def write_report(out_dir: str | Path, spec: JobSpec) -> Path:
    """Writes `<out_dir>/report.html` (Ray must be up or startable from the spec); returns its path."""
    from lvd.jobs.engines import ensure_ray
    from lvd.jobs.pipeline import stage_summaries

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    ensure_ray(spec)
    summaries = stage_summaries(out_dir)
    decision_parts = layout.list_parts(layout.table_dir(out_dir, layout.DECISIONS))
    ingest_parts = layout.list_parts(layout.table_dir(out_dir, layout.IMAGES))
    threshold = spec.dedup.threshold
    bins = sim_bins(threshold)

    centroid_file = layout.table_file(out_dir, layout.CENTROIDS)
    columns = ["level", "cluster_id", "size"]
    centroids = pq.read_table(centroid_file, columns=columns) if centroid_file.exists() else None
    if centroids is None:
        centroids = pa.table({"level": pa.array([], pa.int32()), "cluster_id": pa.array([], pa.int32()),
                              "size": pa.array([], pa.int64())})  # fmt: skip
    levels = sorted(set(centroids["level"].to_pylist()))
    before = []
    for lv in levels:
        c = centroids.filter(pc.field("level") == lv)
        sizes = np.zeros(max(c["cluster_id"].to_pylist(), default=-1) + 1, np.int64)
        sizes[c["cluster_id"].to_numpy()] = c["size"].to_numpy()
        before.append(sizes)
    level_sizes = [len(b) for b in before]
    nonempty = np.flatnonzero(before[0] > 0) if before else np.zeros(0, np.int64)
    sample_clusters = nonempty[np.argsort(draw(nonempty), kind="stable")[:SAMPLE_CLUSTERS]].tolist()

    stats = run_tasks(
        part_stats, decision_parts, name="report: decisions", bins=bins, level_sizes=level_sizes,
        clusters=sample_clusters,
    )  # fmt: skip
    components = Counter()
    outcomes = Counter()
    pair_counts = np.zeros(len(bins) + 1, np.int64)
    after = [np.zeros(k) for k in level_sizes]
    pairs, evals, members, cex = [], [], [], []
    cluster_retrieved: dict[str, Counter] = {}
    for st in stats:
        components.update(st.component_counts)
        outcomes.update(st.outcomes)
        pair_counts += st.pair_counts
        after = [a + b for a, b in zip(after, st.after, strict=True)]
        pairs += st.pairs
        evals += st.evals
        members += st.members
        cex += st.cluster_examples
        for k, v in st.cluster_retrieved.items():
            cluster_retrieved.setdefault(k, Counter()).update(v)
    evals = sorted(evals, key=lambda e: draw(np.array([e["image_id"]]))[0])[:EVAL_SHOWN]
    top = [c for c, _ in sorted(components.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_COMPONENTS]]
    strips = run_tasks(
        component_members, decision_parts, name="report: components", components=np.array(top, np.int64)
    ) if top else []  # fmt: skip
    strip_rows = [r for part in strips for r in part]

    # Pairs below the threshold: nearest neighbours within a keyed sample of kept images.
    model = copy_detection_model(spec)
    embed = {
        layout.part_index(p): p
        for p in layout.list_parts(layout.table_dir(out_dir, layout.EMBEDDINGS), model)
    }
    dedup_parts = {
        layout.part_index(p): p for p in layout.list_parts(layout.table_dir(out_dir, layout.DEDUP))
    }
    chosen = sorted(set(embed) & set(dedup_parts), key=lambda i: draw(np.array([i]))[0])[:NEAR_MISS_PARTS]
    rows_chosen = sum(pq.ParquetFile(dedup_parts[i]).metadata.num_rows for i in chosen) or 1
    fraction = min(1.0, NEAR_MISS_SAMPLE / rows_chosen)
    got = run_tasks(
        near_miss_vectors,
        [VectorPart(embed[i], rows=dedup_parts[i], where=pc.field("keep")) for i in chosen],
        name="report: near-miss sample",
        fraction=fraction,
    )
    near = []
    if got:
        ids = np.concatenate([g[0] for g in got])
        vec = np.concatenate([g[1] for g in got]) if ids.size else np.zeros((0, 1), np.float32)
        if ids.size > 1:
            sims = vec @ vec.T
            np.fill_diagonal(sims, -np.inf)
            nn = sims.argmax(1)
            best = sims[np.arange(ids.size), nn]
            idx = np.clip(np.digitize(best, bins) - 1, -1, len(bins) - 1)
            for b in np.unique(idx):
                if b < 0:
                    continue
                sel = np.flatnonzero(idx == b)
                sel = sel[np.argsort(draw(ids[sel]), kind="stable")[:PER_BIN]]
                near += [{"a": int(ids[i]), "b": int(ids[nn[i]]), "cos": float(best[i])} for i in sel]
            near_counts = np.bincount(idx + 1, minlength=len(bins) + 1)
        else:
            near_counts = np.zeros(len(bins) + 1, np.int64)
        near_n = int(ids.size)
    else:
        near_counts, near_n = np.zeros(len(bins) + 1, np.int64), 0

    # Retrieval examples.
    retrieved_parts = layout.list_parts(layout.table_dir(out_dir, layout.RETRIEVED))
    seed_rows: dict[str, list[dict]] = {}
    for seed in spec.seeds:
        if seed.strategy != "sample":
            continue
        found = [r for part in run_tasks(seed_examples, retrieved_parts, name=f"report: {seed.name}",
                                         seed_set=seed.name) for r in part]  # fmt: skip
        ids = sorted({r["seed_id"] for r in found}, key=lambda i: draw(np.array([i]))[0])[:SEEDS_SHOWN]
        seed_rows[seed.name] = [r for r in found if r["seed_id"] in ids]
    other_sets = [layout.seed_dataset(s.name) for s in spec.seeds if s.strategy != "sample"]
    seed_samples = [r for part in run_tasks(dataset_sample, ingest_parts, name="report: seed images",
                                            datasets=other_sets, n=8) for r in part] if other_sets else []  # fmt: skip
    seeds_per_cluster = _seeds_per_cluster(out_dir, spec, ingest_parts, embed_parts=layout.list_parts(
        layout.table_dir(out_dir, layout.EMBEDDINGS), layout.RETRIEVAL))  # fmt: skip

    # Output: samples read back from a few shards, and the share of each source.
    shard_dir = layout.shards_dir(out_dir)
    shard_parts = layout.shard_tables(shard_dir)  # the latest version's
    shard_results = run_tasks(shard_stats, shard_parts, name="report: shards")
    source_counts, n_samples = Counter(), 0
    for sources, n, _ in shard_results:
        source_counts.update(sources)
        n_samples += n
    read_back = [s for p in sorted(shard_parts, key=lambda p: draw(np.array([hash_key(p.name)]))[0])[:OUTPUT_SHARDS]
                 for s in shard_results[shard_parts.index(p)][2]]  # fmt: skip
    read_back = sorted(read_back, key=lambda s: draw(np.array([hash_key(s["key"])]))[0])[:OUTPUT_GRID]
    by_shard: dict[str, list[str]] = {}
    for s in read_back:
        by_shard.setdefault(s["shard"], []).append(s["key"])
    shard_thumbs: dict[str, str | None] = {}
    for part in run_tasks(
        shard_thumbnails, sorted(by_shard.items()), name="report: shard samples", folder=shard_dir
    ):
        shard_thumbs.update(part)

    # Thumbnails of every image shown, made by workers from the ingest parts.
    wanted = {p["a"] for p in pairs + near} | {p["b"] for p in pairs + near}
    wanted |= {e["image_id"] for e in evals} | {e["eval_match"] for e in evals}
    wanted |= {r["image_id"] for r in strip_rows} | {m["image_id"] for m in members}
    wanted |= {e["image_id"] for e in cex} | {r["image_id"] for r in seed_samples}
    for rows in seed_rows.values():
        wanted |= {r["image_id"] for r in rows} | {r["seed_id"] for r in rows}
    wanted_ids = np.array(sorted(i for i in wanted if i is not None), np.int64)
    thumbs: dict[int, dict] = {}
    if wanted_ids.size:
        for part in run_tasks(thumbnails_of_part, ingest_parts, name="report: thumbnails", ids=wanted_ids):
            thumbs.update(part)

    page = Page(thumbs)
    page.add(f"<h1>lvd report: job {_esc(spec.name)}</h1>")
    page.add(
        f'<p class="note">output {_esc(out_dir)}; written {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}. '
        "Everything below is read from the job's tables; pictures are samples (keyed draws), not every image. "
        f"One image's whole story: <code>lvd explain {_esc(out_dir)} IMAGE_ID_OR_URI</code>.</p>"
    )
    _funnel_section(page, spec, summaries, outcomes)
    _dedup_section(
        page, spec, components, top, strip_rows, bins, pair_counts, pairs, near_counts, near, near_n, evals
    )
    _cluster_section(page, levels, before, after, members)
    sizes = before[0] if before else np.zeros(0, np.int64)
    _retrieval_section(
        page, spec, seed_rows, seed_samples, cluster_retrieved, cex, seeds_per_cluster, summaries, sizes
    )
    _output_section(page, source_counts, n_samples, read_back, shard_thumbs, len(shard_parts))
    page.add(f'<p class="note">report made in {time.perf_counter() - t0:.1f} s.</p>')

    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lvd report: {_esc(spec.name)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(page.parts)
        + "\n</body></html>\n"
    )
    path = out_dir / layout.REPORT_HTML
    tmp = layout.temp_path(path)
    try:
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _seeds_per_cluster(
    out_dir: Path, spec: JobSpec, ingest_parts: list[Path], embed_parts: list[Path]
) -> dict:
    """For cluster-based seed sets on the cluster stage's level-0 clusters: seed images per cluster."""
    sets = [s for s in spec.seeds if s.strategy == "cluster" and s.num_clusters is None]
    if not sets:
        return {}
    cent = (
        pq.read_table(layout.table_file(out_dir, layout.CENTROIDS))
        .filter(pc.field("level") == 0)
        .sort_by("cluster_id")
    )
    centroids = np.asarray(cent["centroid"].to_pylist(), np.float32).reshape(cent.num_rows, -1)
    embed = {layout.part_index(p): p for p in embed_parts}
    out = {}
    for seed in sets:
        flt = (pc.field("dataset") == layout.seed_dataset(seed.name)) & (pc.field("status") == "ok")
        queries = [VectorPart(embed[layout.part_index(p)], rows=p, where=flt) for p in ingest_parts
                   if layout.part_index(p) in embed]  # fmt: skip
        counts = run_tasks(seed_cluster_counts, queries, name=f"report: {seed.name} seeds per cluster",
                           centroids=centroids, spherical=spec.clustering.spherical)  # fmt: skip
        out[seed.name] = np.sum(counts, axis=0) if counts else np.zeros(len(centroids), np.int64)
    return out


def _funnel_section(page: Page, spec: JobSpec, summaries: dict, outcomes: Counter) -> None:
    page.add('<h2 id="funnel">Funnel</h2>')
    rows, names, secs = [], [], []
    for name, (summary, seconds) in summaries.items():
        if summary is None:
            continue
        count = next(
            (getattr(summary, f) for f in ("images", "samples", "rows") if hasattr(summary, f)), None
        )
        funnel = "; ".join(f"{label} {value}" for label, value in summary.funnel())
        rows.append([name, funnel, count if count is not None else "-", seconds if seconds is not None else "-",
                     _rate(count, seconds)])  # fmt: skip
        if seconds is not None:
            names.append(name)
            secs.append(seconds)
    page.table(["stage", "funnel", "images", "seconds", "images/s"], rows, left=2)
    page.add("<h3>Models</h3>")
    page.table(["role", "arch", "weights", "random"], _model_rows(spec, summaries), left=3)
    if any(r[3] == "yes" for r in _model_rows(spec, summaries)):
        page.add('<p class="note">A model with random weights gives vectors that only stand in for real ones '
                 "(testing): dedup, clusters and retrieval below reflect that.</p>")  # fmt: skip
    page.add("<h3>Where every pool image ended</h3>")
    page.table(["outcome", "images"], [[k, v] for k, v in sorted(outcomes.items())])
    if names:
        fig, ax = _figure(6, 0.35 * len(names) + 0.8)
        ax[0, 0].barh(names[::-1], secs[::-1], color="#4a7")
        ax[0, 0].set_xlabel("seconds")
        page.plot(_png(fig), "seconds per stage")


def _dedup_section(
    page, spec, components, top, strip_rows, bins, pair_counts, pairs, near_counts, near, near_n, evals
):
    page.add('<h2 id="dedup">Dedup</h2>')
    sizes = np.array([c + 1 for c in components.values()], np.int64)
    page.add(f"<p>{len(sizes)} duplicate groups (components of more than one image); threshold "
             f"{spec.dedup.threshold}, eval threshold {spec.dedup.eval_threshold}.</p>")  # fmt: skip
    if sizes.size:
        fig, ax = _figure()
        values, counts = np.unique(sizes, return_counts=True)
        ax[0, 0].bar(values, counts, width=0.8 if values.max() < 40 else 1.0, color="#c74")
        ax[0, 0].xaxis.get_major_locator().set_params(integer=True)
        ax[0, 0].set_xlabel("component size (images)")
        ax[0, 0].set_ylabel("components")
        page.plot(_png(fig), "component size histogram")
    page.add("<h3>Largest components</h3>")
    for c in top:
        rows = [r for r in strip_rows if r["component_id"] == c]
        page.add(f'<p>component {c}: {components[c] + 1} images</p><div class="strip">')
        for r in rows:
            cos = "" if r["duplicate_cosine"] is None else f" {r['duplicate_cosine']:.2f}"
            page.add(page.img(r["image_id"], f"{r['dedup'] or ''}{cos}"))
        page.add("</div>")
    page.add("<h3>Pairs around the threshold</h3>")
    labels = ["< " + str(bins[0])] + [
        f"{b:.2f}-{b + 0.05:.2f}" if i < len(bins) - 1 else f">= {b:.2f}" for i, b in enumerate(bins)
    ]
    page.table(
        [
            "cosine bin",
            "duplicates (to the image kept)",
            f"nearest pairs in a sample of {near_n} kept images",
        ],
        [[lab, int(a), int(b)] for lab, a, b in zip(labels, pair_counts, near_counts, strict=True)],
    )
    fig, ax = _figure()
    x = np.arange(len(labels))
    ax[0, 0].bar(x - 0.2, pair_counts, 0.4, label="duplicates", color="#c74")
    ax[0, 0].bar(x + 0.2, near_counts, 0.4, label="kept sample, nearest", color="#47c")
    ax[0, 0].set_xticks(x, labels, rotation=45, fontsize=7)
    ax[0, 0].legend(fontsize=7)
    page.plot(_png(fig), "pairs per similarity bin")
    for title, items in (
        ("duplicates and the image they lost to", pairs),
        ("kept images and their nearest kept neighbour", near),
    ):
        page.add(f"<p>{title}, by cosine:</p><div>")
        for p in sorted(items, key=lambda p: p["cos"]):
            caption = f"cos {p['cos']:.3f}"
            page.add(f'<span class="pair">{page.img(p["a"], str(p["a"]))}{page.img(p["b"], caption)}</span>')
        page.add("</div>")
    page.add("<h3>Eval-set matches</h3>")
    if not evals:
        page.add("<p>No pool image overlaps the eval sets.</p>")
    page.add("<div>")
    for e in evals:
        cos = "?" if e["eval_cosine"] is None else f"{e['eval_cosine']:.3f}"
        page.add(
            f'<span class="pair">{page.img(e["image_id"], "pool")}{page.img(e["eval_match"], f"eval, cos {cos}")}</span>'
        )
    page.add("</div>")


def _cluster_section(page, levels, before, after, members):
    page.add('<h2 id="clusters">Clusters</h2>')
    for lv, b, a in zip(levels, before, after, strict=True):
        fig, ax = _figure(8, 2.4, 2)
        for axis, values, title in (
            (ax[0, 0], b, "pool images per cluster"),
            (ax[0, 1], a, "output samples per cluster"),
        ):
            axis.hist(values, bins=min(30, max(5, len(values) // 2)), color="#47c")
            axis.set_title(f"level {lv}: {title}", fontsize=9)
            axis.set_xlabel("cluster size")
        page.plot(_png(fig), f"cluster sizes level {lv} before and after balancing")
        page.add(f'<p class="note">level {lv}: {len(b)} clusters; largest/smallest before {int(b.max()) if len(b) else 0}/'
                 f"{int(b.min()) if len(b) else 0}, after {int(a.max()) if len(a) else 0}/{int(a.min()) if len(a) else 0}.</p>")  # fmt: skip
    page.add("<h3>Sampled clusters: members closest to, at random from and farthest from the centroid</h3>")
    for c in sorted({m["cluster"] for m in members}):
        page.add(f"<p>level-0 cluster {c}</p>")
        for kind in ("closest", "random", "farthest"):
            rows = [m for m in members if m["cluster"] == c and m["kind"] == kind]
            rows = sorted(rows, key=lambda m: m["cluster_distance"])
            if kind == "closest":
                rows = rows[:PER_CLUSTER]
            elif kind == "farthest":
                rows = rows[-PER_CLUSTER:]
            else:
                rows = sorted(rows, key=lambda m: draw(np.array([m["image_id"]]))[0])[:PER_CLUSTER]
            page.add(f'<div class="strip"><span class="note" style="width:70px">{kind}</span>')
            page.add("".join(page.img(m["image_id"], f"d {m['cluster_distance']:.3f}") for m in rows))
            page.add("</div>")


def _retrieval_section(
    page, spec, seed_rows, seed_samples, cluster_retrieved, cex, seeds_per_cluster, summaries, sizes
):
    page.add('<h2 id="retrieval">Retrieval</h2>')
    if not spec.seeds:
        page.add("<p>The job has no seed sets.</p>")
    summary = summaries.get("retrieve", (None, None))[0]
    for seed in spec.seeds:
        n = summary.per_seed_set.get(seed.name, 0) if summary else 0
        page.add(f"<h3>{_esc(seed.name)} ({seed.strategy}): {n} rows</h3>")
        if seed.strategy == "sample":
            rows = seed_rows.get(seed.name, [])
            for sid in sorted({r["seed_id"] for r in rows}, key=lambda i: draw(np.array([i]))[0]):
                hits = sorted((r for r in rows if r["seed_id"] == sid), key=lambda r: r["rank"])
                page.add('<div class="strip">' + page.img(sid, "seed") + "&rarr;")
                page.add(
                    "".join(page.img(r["image_id"], f"#{r['rank'] + 1} cos {r['score']:.3f}") for r in hits)
                )
                page.add("</div>")
            continue
        samples = [r for r in seed_samples if r["dataset"] == layout.seed_dataset(seed.name)]
        page.add(
            '<p>some seed images:</p><div class="strip">'
            + "".join(page.img(r["image_id"], "seed") for r in samples)
            + "</div>"
        )
        if seed.strategy == "cluster":
            counts = cluster_retrieved.get(seed.name, Counter())
            per = seeds_per_cluster.get(seed.name)
            page.add(f"<p>A cluster is chosen when it holds more than min_seed_images={seed.min_seed_images} seed "
                     f"images (most seeds first); it gives up to images_per_cluster={seed.images_per_cluster} of its "
                     f"members nearest the centroid, up to max_images={seed.max_images} for the set.</p>")  # fmt: skip
            with_seeds = set(counts) | (set(np.flatnonzero(per).tolist()) if per is not None else set())
            order = sorted(with_seeds, key=lambda c: (-(per[c] if per is not None else 0), -counts[c], c))
            rows = []
            for c in order[:MAX_CLUSTER_ROWS]:
                seeds_in = int(per[c]) if per is not None and 0 <= c < len(per) else "?"
                size = int(sizes[c]) if 0 <= c < len(sizes) else "?"
                rows.append([c, seeds_in, "yes" if counts[c] else "no", size, counts[c]])
            if seed.num_clusters is not None:
                page.add(f'<p class="note">This set used its own k-means (num_clusters={seed.num_clusters}); the '
                         "cluster ids below are the cluster stage's level-0 clusters of the retrieved images.</p>")  # fmt: skip
            header = [
                "level-0 cluster",
                "seed images in it",
                "chosen",
                "pool images in it",
                "images retrieved",
            ]
            page.table(header, rows)
            for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:SAMPLE_CLUSTERS]:
                ex = [e for e in cex if e["seed_set"] == seed.name and e["cluster"] == c][:PER_CLUSTER]
                page.add(f'<div class="strip"><span class="note">cluster {c}</span>'
                         + "".join(page.img(e["image_id"], f"rank {e['rank']}") for e in ex) + "</div>")  # fmt: skip


def _output_section(page, source_counts, n_samples, read_back, shard_thumbs, n_shards):
    page.add('<h2 id="output">Output</h2>')
    page.add(f"<p>{n_samples} samples in {n_shards} shards.</p>")
    if source_counts:
        names = sorted(source_counts)
        page.table(
            ["source", "samples", "share"],
            [[s, source_counts[s], f"{source_counts[s] / max(n_samples, 1):.1%}"] for s in names],
        )
        fig, ax = _figure(6, 0.35 * len(names) + 0.8)
        ax[0, 0].barh(names, [source_counts[s] / max(n_samples, 1) for s in names], color="#7a4")
        ax[0, 0].set_xlabel("share of samples (a sample may come from several sources)")
        page.plot(_png(fig), "share of each source")
    page.add('<p>Random samples read back from the shards:</p><div class="strip">')
    for s in read_back:
        page.add(page.img(s["image_id"], s["key"], thumb=shard_thumbs.get(s["key"])))
    page.add("</div>")
