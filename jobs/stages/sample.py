"""sample stage: the curated set = retrieved pool images + as-is seed images + a balanced sample of
`sampling.target_size` drawn from the cluster hierarchy.

`repeats` is how many times an image appears in the dataset: its balanced-sample count, and at
least 1 for an image that was retrieved (retrieval adds an image once, it does not add copies).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from lvd.curation.sampling import balanced_sample
from lvd.curation.stage_io import write_parts
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout
from lvd.schemas.tables import CLUSTERS, CURATED, RETRIEVED, read_parts

log = logging.getLogger("lvd")

BALANCED = "balanced"


@dataclass
class SampleSummary(StageSummary):
    FUNNEL = (
        ("balanced sample (images)", "balanced_images"),
        ("curated images", "images"),
        ("curated samples (with repeats)", "samples"),
    )
    images: int = 0
    samples: int = 0
    balanced: int = 0
    balanced_images: int = 0
    retrieved: int = 0


def run(ctx: StageContext) -> SampleSummary:
    cfg = ctx.spec.sampling
    retrieved = read_parts(
        ctx.parts(layout.RETRIEVED), RETRIEVED, columns=["image_id", "seed_set"]
    ).to_pandas()
    rows = [retrieved.assign(repeats=1).rename(columns={"seed_set": "source"})]
    balanced_ids, balanced_repeats = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if cfg.target_size > 0:
        clusters = read_parts(ctx.parts(layout.CLUSTERS), CLUSTERS, columns=["image_id", "cluster_ids"])
        if clusters.num_rows:
            levels = len(clusters["cluster_ids"][0])
            flat = clusters["cluster_ids"].combine_chunks().flatten().to_numpy()
            labels = flat.reshape(-1, levels).astype(np.int64)
            picked, balanced_repeats = balanced_sample(
                labels,
                cfg.target_size,
                max_repeats=cfg.max_repeats,
                seed=cfg.seed,
                ids=clusters["image_id"].to_numpy(),
            )
            balanced_ids = clusters["image_id"].to_numpy()[picked]
        rows.append(pd.DataFrame({"image_id": balanced_ids, "source": BALANCED, "repeats": balanced_repeats}))
    union = pd.concat(rows, ignore_index=True)
    curated = (
        union.groupby("image_id", sort=True)
        .agg(sources=("source", lambda s: sorted(set(s))), repeats=("repeats", "max"))
        .reset_index()
    )
    table = pa.table(
        {
            "image_id": pa.array(curated["image_id"].to_numpy(), pa.int64()),
            "sources": pa.array(curated["sources"].tolist(), pa.list_(pa.string())),
            "repeats": pa.array(curated["repeats"].to_numpy(), pa.int32()),
        }
    )
    write_parts(table, ctx.output_dir(layout.CURATED), CURATED)
    if cfg.target_size and balanced_repeats.sum() < cfg.target_size:
        log.warning(
            "sample: the pool holds only %d samples of the %d asked", balanced_repeats.sum(), cfg.target_size
        )
    summary = SampleSummary(
        images=table.num_rows,
        samples=int(curated["repeats"].sum()),
        balanced=int(balanced_repeats.sum()),
        balanced_images=int(balanced_ids.size),
        retrieved=int(retrieved["image_id"].nunique()),
    )
    log.info("sample: %s", summary)
    return summary


STAGE = Stage(
    name="sample",
    reads=(layout.RETRIEVED, layout.CLUSTERS),
    writes=(layout.CURATED,),
    spec_sections=("sampling",),
    resources=Resources(engine="ray"),
    summary=SampleSummary,
    run=run,
)
