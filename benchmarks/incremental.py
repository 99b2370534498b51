"""An incremental run vs a full rerun of the union, measured in the same process.

A demo job (`lvd demo` data, `--n` pool images) runs to the end. Then a new pool source with about
10% more images (the plain-file part of a second demo pool, other seed) is added to its spec, and:
  incremental: the job runs again in its own output folder (reusing what it can);
  full:        the same spec runs from nothing in another output folder.
Printed: both times, their ratio, each stage's seconds in both, what each stage reused, and whether
the two runs' dedup decisions and sample-based seed lists are equal. Ray and Spark are warm for both
(the first run started them).
Embedding is the per-image cost that dominates a real full run; at a few hundred images the stages'
fixed costs (task rounds, Spark jobs) dominate instead, so measure at ten thousand or more.

    .venv/bin/python benchmarks/incremental.py --n 10000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def _spec_with(job_yaml: Path, source: Path, out: Path, name: str) -> Path:
    doc = yaml.safe_load(job_yaml.read_text())
    doc["pool"].append({"uri": str(source)})
    doc["output_dir"] = str(out)
    path = job_yaml.with_name(name)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _timed(spec):
    from lvd.jobs.pipeline import run_job

    t0 = time.perf_counter()
    reports = run_job(spec)
    return time.perf_counter() - t0, {r.name: r for r in reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="pool images of the first run")
    ap.add_argument("--grow", type=float, default=0.10, help="new images as a fraction of the pool")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()

    import pandas as pd

    from lvd.jobs.demo import MIN_IMAGES, build_demo
    from lvd.jobs.engines import shutdown_ray
    from lvd.schemas import ids, layout
    from lvd.schemas.job_spec import load_job_spec

    work = args.dir or Path(tempfile.mkdtemp(prefix="lvd-incremental-"))
    base = work / "base"
    job_yaml = build_demo(base, n_images=args.n)
    # The demo puts half its pool in plain files: a second pool of 2 x grow x n gives the new folder.
    extra = build_demo(work / "extra", n_images=max(MIN_IMAGES, round(2 * args.grow * args.n)), seed=1)
    new_source = extra.parent / "data" / "pool" / "folder"
    n_new = sum(1 for p in new_source.rglob("*") if p.is_file())

    first = load_job_spec(job_yaml)
    print(f"first run: {args.n} pool images ({_load()})", flush=True)
    t_first, _ = _timed(first)
    grown_out = Path(first.output_dir)
    inc_spec = load_job_spec(_spec_with(job_yaml, new_source, grown_out, "job-grown.yaml"))
    full_spec = load_job_spec(_spec_with(job_yaml, new_source, work / "full-output", "job-full.yaml"))

    def curated(out) -> dict[int, int]:
        t = layout.read_table(out, layout.CURATED, columns=["image_id", "repeats"])
        return dict(zip(t["image_id"].to_pylist(), t["repeats"].to_pylist(), strict=True))

    picks_before = curated(grown_out)
    print(f"incremental run: +{n_new} files in a new source ({_load()})", flush=True)
    t_inc, inc = _timed(inc_spec)
    print(f"full rerun of the union ({_load()})", flush=True)
    t_full, full = _timed(full_spec)
    shutdown_ray()

    def decisions(out) -> pd.DataFrame:
        cols = ["image_id", "component_id", "keep", "reason", "duplicate_of"]
        t = ids.to_pandas(layout.read_table(out, layout.DEDUP, columns=cols))
        return t.sort_values("image_id").reset_index(drop=True)

    same = decisions(inc_spec.output_dir).equals(decisions(full_spec.output_dir))

    def sample_lists(out) -> pd.DataFrame:
        """The sample-based seed sets' rows (the cluster-based ones depend on the clustering, which
        the incremental run keeps and the full rerun refits)."""
        t = layout.read_table(out, layout.RETRIEVED).to_pandas()
        t = t[t["strategy"] == "sample"][["seed_set", "seed_id", "rank", "image_id"]]
        return t.sort_values(["seed_set", "seed_id", "rank"]).reset_index(drop=True)

    same_lists = sample_lists(inc_spec.output_dir).equals(sample_lists(full_spec.output_dir))
    print()
    print(f"{'stage':<10} {'full s':>8} {'incr s':>8}  reused by the incremental run")
    for name, r in full.items():
        s = inc[name].summary
        reused = ""
        if hasattr(s, "parts_reused"):
            reused = f"{s.parts_reused} of {s.parts_reused + s.parts_written} parts"
        if name == "cluster":
            reused = "refit" if s.refit else "assigned to the earlier centroids"
        if name == "dedup":
            searched = f"{s.queries_against_pool} of {r.summary.queries_against_pool} images searched against the pool"
            reused = f"{searched}; {s.incremental}" if s.incremental else f"a full run ({searched})"
        if name == "retrieve":
            reused = s.incremental or "every seed set searched in full"
        if name == "shards":
            reused = f"{s.unchanged} of {s.unchanged + s.new} shards kept unchanged"
        print(f"{name:<10} {r.seconds:8.1f} {inc[name].seconds:8.1f}  {reused}")
    print()
    print(f"first run {t_first:.1f} s; incremental {t_inc:.1f} s; full rerun of the union {t_full:.1f} s")
    print(f"incremental / full = {t_inc / t_full:.2f}  (target <= 0.25)")
    print(f"dedup decisions equal to the full rerun's: {same}")
    print(f"sample-based seed lists equal to the full rerun's: {same_lists}")
    picks_after = curated(inc_spec.output_dir)
    stable = sum(1 for i, r in picks_before.items() if picks_after.get(i) == r)
    shards = inc["shards"].summary
    print(
        f"curated images with the same repeats as the first run: {stable} of {len(picks_after)} "
        f"({len(picks_before)} before); shards kept unchanged: {shards.unchanged} of "
        f"{shards.unchanged + shards.new}"
    )
    print(_load())


if __name__ == "__main__":
    main()
