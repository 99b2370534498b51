"""The report stage on the demo job (shared with test_e2e): the decisions table against the stage
tables, report.html (a pure-Python check, and headless Chromium when installed) and `lvd explain`
for each kind of decision."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from lvd.curation.stage_io import copy_detection_model
from lvd.jobs.cli import app
from lvd.jobs.report_html import OUTPUT_GRID, PLACEHOLDER, SECTIONS
from lvd.schemas import layout


@pytest.fixture(scope="module")
def job(demo_job):
    spec, _, _, _ = demo_job
    return spec, Path(spec.output_dir)


@pytest.fixture(scope="module")
def tables(job):
    """The demo's stage tables as pandas frames (a few hundred rows: fine for a test)."""
    spec, out = job
    t = {
        name: layout.read_table(out, table).to_pandas(integer_object_nulls=True)
        for name, table in (
            ("images", layout.IMAGES),
            ("dedup", layout.DEDUP),
            ("clusters", layout.CLUSTERS),
            ("retrieved", layout.RETRIEVED),
            ("curated", layout.CURATED),
            ("decisions", layout.DECISIONS),
        )
    }
    shard_parts = sorted(layout.shards_dir(out).glob("lvd-*.parquet"))
    t["shards"] = pq.read_table(shard_parts).to_pandas() if shard_parts else None
    vectors = layout.read_table(out, layout.EMBEDDINGS, model=copy_detection_model(spec)).to_pandas()
    vectors = vectors[vectors.vector.notna()]
    t["vector"] = {
        i: np.asarray(v, np.float64) for i, v in zip(vectors.image_id, vectors.vector, strict=True)
    }
    return t


def _cos(vec: dict, a: int, b: int) -> float:
    x, y = vec[a], vec[b]
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


# ---------------------------------------------------------------- the decisions table


def test_decisions_hold_every_pool_image_once_with_each_stage_outcome(tables):
    d, images = tables["decisions"], tables["images"]
    pool = images[images.dataset == "pool"]
    assert sorted(d.image_id) == sorted(pool.image_id)
    d = d.set_index("image_id")
    errors = pool[pool.status == "error"].image_id
    assert len(errors) and (d.loc[errors, "stage"] == "ingest").all()
    dedup = tables["dedup"].set_index("image_id")
    kept = d.loc[dedup.index, "dedup"] == "kept"
    assert (kept == dedup.keep).all()
    assert (d.loc[dedup.index[~dedup.keep], "dedup"] == dedup.reason[~dedup.keep]).all()
    curated = tables["curated"].set_index("image_id")
    pool_curated = curated.index.intersection(d.index)
    assert (
        d.loc[pool_curated, "repeats"].to_numpy() == curated.loc[pool_curated, "repeats"].to_numpy()
    ).all()
    assert (d.drop(pool_curated).repeats == 0).all()
    assert set(d.index[d.outcome == "in output"]) == set(pool_curated)
    shards = tables["shards"]
    for image_id, keys in d.loc[pool_curated, "keys"].items():
        assert sorted(keys) == sorted(shards[shards.image_id == image_id].key)


def test_duplicate_cosines_are_those_of_the_vectors(tables):
    d, vec = tables["decisions"], tables["vector"]
    dups = d[d.dedup.isin(["exact", "copy"])]
    assert len(dups) > 0 and dups.duplicate_cosine.notna().all()
    for r in dups.itertuples():
        assert r.duplicate_cosine == pytest.approx(_cos(vec, r.image_id, int(r.duplicate_of)), abs=2e-3)
    assert (dups[dups.dedup == "exact"].duplicate_cosine > 0.999).all()


def test_eval_matches_are_the_nearest_eval_images(tables):
    d, vec, images = tables["decisions"], tables["vector"], tables["images"]
    evals = images[images.dataset.str.startswith("eval:") & (images.status == "ok")].image_id
    evals = [i for i in evals if i in vec]
    lost = d[d.dedup == "eval-overlap"]
    assert len(lost) > 0 and lost.eval_match.notna().all()
    for r in lost.itertuples():
        sims = {e: _cos(vec, r.image_id, e) for e in evals}
        best = max(sims.values())
        assert sims[int(r.eval_match)] == pytest.approx(best, abs=2e-3)
        assert r.eval_cosine == pytest.approx(best, abs=2e-3)


# ---------------------------------------------------------------- report.html


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[dict] = []
        self.ids: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key])


def _decode(src: str) -> tuple[str, tuple[int, int]]:
    """(format, size) of a data-URI image; raises when it does not decode."""
    head, _, data = src.partition(",")
    raw = base64.b64decode(data, validate=True)
    if head == "data:image/svg+xml;base64":
        root = ET.fromstring(raw)
        return "SVG", (int(root.get("width")), int(root.get("height")))
    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return img.format, img.size


def test_report_is_one_self_contained_file_whose_images_all_decode(job):
    _, out = job
    text = (out / layout.REPORT_HTML).read_text()
    page = _Html()
    page.feed(text)
    assert set(SECTIONS) <= set(page.ids)
    assert not page.links  # no stylesheet, script or link to fetch
    assert not re.search(r"(src|href)=\"(?!data:)", text)
    formats = {}
    for img in page.imgs:
        assert img["src"].startswith("data:image/"), img["src"][:40]
        fmt, size = _decode(img["src"])
        assert size[0] > 0 and size[1] > 0
        formats[fmt] = formats.get(fmt, 0) + 1
    assert formats.get("PNG", 0) >= 5  # the plots
    assert formats.get("JPEG", 0) >= 50  # the thumbnails
    # The output grid: samples read back from the shards, each a real thumbnail.
    output = text[text.index('id="output"') :]
    grid = _Html()
    grid.feed(output)
    thumbs = [i for i in grid.imgs if i["src"].startswith("data:image/jpeg")]
    assert len(thumbs) == OUTPUT_GRID
    for section in ("Largest components", "Eval-set matches", "closest", "farthest", "tail_sample"):
        assert section in text
    assert text.count(PLACEHOLDER) < len(page.imgs) // 10
    # The built-in copy detector is named as such, not as a model with random weights.
    detector = r"copy_detection</td><td[^>]*>copy_descriptor</td><td[^>]*>built in[^<]*</td><td[^>]*>no</td>"
    assert re.search(detector, text)


def _chromium() -> str | None:
    return shutil.which("chromium")


PROBE = """<script>
window.lvdErrors = [];
window.addEventListener('error', function (e) { window.lvdErrors.push(String(e.message || e.target.src || e)); }, true);
['error', 'warn'].forEach(function (level) {
  var orig = console[level];
  console[level] = function () { window.lvdErrors.push(level + ': ' + Array.from(arguments).join(' ')); orig.apply(console, arguments); };
});
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  var el = document.createElement('pre'); el.id = 'lvd-probe';
  el.textContent = JSON.stringify({images: imgs.length, broken: broken, errors: window.lvdErrors});
  document.body.appendChild(el);
});
</script>"""


def _render(chromium: str, html_file: Path, profile: Path) -> tuple[dict, str]:
    """Loads a page in headless Chromium; returns the probe's findings and Chromium's log."""
    args = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
        "--dump-dom", html_file.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="lvd-probe">([^<]*)</pre>', done.stdout)
    assert m, f"no probe in Chromium's DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"')), done.stderr


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian package `chromium`)")
def test_report_renders_in_headless_chromium(job, tmp_path):
    _, out = job
    text = (out / layout.REPORT_HTML).read_text()
    n_imgs = text.count("<img ")
    # The probe goes first in <head> so it sees every error while the page loads.
    page = tmp_path / "report.html"
    page.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    found, log = _render(_chromium(), page, tmp_path / "profile")
    assert found == {"images": n_imgs, "broken": [], "errors": []}
    assert "CONSOLE" not in log  # the report itself logs nothing
    # The probe does catch a broken image and a console error.
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("</body>", '<img src="data:image/png;base64,AAAA" alt="x">'
                                            "<script>console.error('boom')</script></body>"))  # fmt: skip
    found, _ = _render(_chromium(), bad, tmp_path / "profile2")
    assert found["broken"] == ["x"] and any("boom" in e for e in found["errors"])


def test_lvd_report_rewrites_the_report(job):
    _, out = job
    path = out / layout.REPORT_HTML
    path.unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert path.exists() and path.stat().st_size > 10_000


# ---------------------------------------------------------------- lvd explain


def _explain(out: Path, image: str) -> str:
    result = CliRunner().invoke(app, ["explain", str(out), image])
    assert result.exit_code == 0, result.output
    return result.output


def _pick(frame, mask) -> int:
    return int(frame[mask].sort_values("image_id").image_id.iloc[0])


def test_explain_a_kept_image_in_the_output(job, tables):
    _, out = job
    dedup, shards = tables["dedup"], tables["shards"]
    image = _pick(dedup, dedup.keep & dedup.image_id.isin(shards.image_id))
    text = _explain(out, str(image))
    assert "IN THE OUTPUT" in text and "dedup: kept" in text
    row = shards[shards.image_id == image].iloc[0]
    assert row.shard in text and row.key in text


def test_explain_an_exact_duplicate(job, tables):
    _, out = job
    dedup, images = tables["dedup"], tables["images"].set_index("image_id")
    image = _pick(dedup, dedup.reason == "exact")
    kept = int(dedup.set_index("image_id").duplicate_of[image])
    assert images.sha256[image] == images.sha256[kept]
    text = _explain(out, str(image))
    assert "DROPPED at dedup" in text and "exact copy" in text and f"image {kept}" in text
    assert "cosine 1.000" in text


def test_explain_a_copy(job, tables):
    _, out = job
    dedup = tables["dedup"]
    image = _pick(dedup, dedup.reason == "copy")
    kept = int(dedup.set_index("image_id").duplicate_of[image])
    text = _explain(out, str(image))
    assert "near-duplicate" in text and f"image {kept}" in text
    cosine = float(re.search(r"copy-detection cosine ([0-9.]+)", text).group(1))
    assert cosine == pytest.approx(_cos(tables["vector"], image, kept), abs=2e-3)


def test_explain_an_eval_overlap(job, tables):
    _, out = job
    d = tables["decisions"]
    image = _pick(d, (d.dedup == "eval-overlap") & (d.eval_cosine > 0.45))
    text = _explain(out, str(image))
    assert "DROPPED at dedup (eval-overlap)" in text
    match = int(re.search(r"matches eval image (\d+)", text).group(1))
    images = tables["images"].set_index("image_id")
    assert images.dataset[match].startswith("eval:")
    assert images.uri[match] in text


def test_explain_a_sample_retrieved_image(job, tables):
    _, out = job
    r = tables["retrieved"]
    pool = set(tables["decisions"].image_id)
    rows = r[(r.strategy == "sample") & r.image_id.isin(pool)].sort_values(["image_id", "seed_id"])
    row = rows.iloc[0]
    text = _explain(out, str(row.image_id))
    assert f"seed set '{row.seed_set}'" in text
    assert f"neighbour #{row['rank'] + 1} of seed image {row.seed_id}" in text
    assert f"cosine {row.score:.3f}" in text


def test_explain_a_cluster_retrieved_image(job, tables):
    _, out = job
    r, clusters = tables["retrieved"], tables["clusters"].set_index("image_id")
    row = r[r.strategy == "cluster"].sort_values("image_id").iloc[0]
    text = _explain(out, str(row.image_id))
    leaf = clusters.cluster_ids[row.image_id][0]
    assert f"seed set '{row.seed_set}': a member of level-0 cluster {leaf}" in text
    assert "IN THE OUTPUT" in text


def test_explain_a_balanced_pick_and_one_left_out(job, tables):
    _, out = job
    curated = tables["curated"]
    only_balanced = curated[curated.sources.apply(lambda s: list(s) == ["balanced"])]
    image = _pick(only_balanced, only_balanced.repeats > 0)
    repeats = int(only_balanced.set_index("image_id").repeats[image])
    text = _explain(out, str(image))
    assert "drawn by the balanced sample" in text and f"{repeats} sample(s) in the output" in text
    assert "retrieve: no seed set retrieved it" in text
    dedup = tables["dedup"]
    left_out = _pick(dedup, dedup.keep & ~dedup.image_id.isin(curated.image_id))
    assert "DROPPED at sample" in _explain(out, str(left_out))


def test_explain_by_uri_and_an_unknown_image(job, tables):
    _, out = job
    images = tables["images"]
    bad = images[(images.dataset == "pool") & (images.status == "error")].iloc[0]
    text = _explain(out, bad.uri)
    assert f"image {bad.image_id}" in text and "DROPPED at ingest" in text and bad.error in text
    result = CliRunner().invoke(app, ["explain", str(out), "12345"])
    assert result.exit_code == 1 and "no pool image" in result.output
