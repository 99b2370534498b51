"""Dedup on real images: the real-image corpus, the built-in copy detector on it, chaining and the
leader grouping, and a job run on the corpus up to dedup."""

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from lvd.curation.copy_verifier import verify_pairs
from lvd.curation.dedup import (
    band_pairs,
    component_decisions,
    copy_detection_edges,
    dedup_pool,
    graph_nodes,
    verified_edges,
)
from lvd.curation.knn import normalize
from lvd.embeddings import copy_descriptor
from lvd.jobs.copy_corpus import build_copy_corpus, embed_corpus, load_packaged_image, pair_quality
from lvd.jobs.demo import write_copy_detection_model
from lvd.jobs.pipeline import run_job
from lvd.jobs.stages.dedup import DedupSummary, _record_components
from lvd.schemas import layout
from lvd.schemas.job_spec import DedupSpec, ModelSpec, parse_job_spec

VERIFY_FROM = 0.7  # benchmarks/dedup_quality.py's band for copy_descriptor
# The least a job spec needs, for the tests of how a dedup section is validated.
MINIMAL_SPEC = {
    "name": "j",
    "output_dir": "o",
    "pool": [{"uri": "p"}],
    "embedding": {"retrieval": {"weights": "random"}},
    "sampling": {"target_size": 1},
}

DESCRIPTOR = ModelSpec(
    arch="copy_descriptor",
    image_size=copy_descriptor.SIZE,
    resize_size=copy_descriptor.SIZE,
    dtype="float32",
)


@pytest.fixture(scope="module")
def corpus():
    return build_copy_corpus(seed=2)


def test_corpus_is_deterministic_with_copy_groups_of_each_kind(corpus):
    again = build_copy_corpus(seed=2)
    assert [im.data for im in again.images] == [im.data for im in corpus.images]
    kinds = {im.kind for im in corpus.images}
    assert kinds == {"original", "copy", "icon"}
    groups = corpus.groups
    for im in corpus.images:
        if im.kind == "copy":  # each copy shares its group with exactly one original
            members = [o for o in corpus.images if o.group == im.group and o.kind == "original"]
            assert len(members) == 1 and im.edits
        if im.kind == "icon":
            assert (groups == im.group).sum() == 3
    names = [im.name for im in corpus.images]
    assert len(set(names)) == len(names)
    assert corpus.copy_pairs().shape[0] == sum(n * (n - 1) // 2 for n in np.bincount(groups))


@pytest.fixture(scope="module")
def descriptor_vectors(corpus):
    return embed_corpus(corpus, DESCRIPTOR)


def test_copy_descriptor_reaches_the_target_where_the_old_stand_in_does_not(
    corpus, descriptor_vectors, tmp_path_factory
):
    assert descriptor_vectors.shape == (len(corpus.images), copy_descriptor.DIM)
    assert np.allclose(np.linalg.norm(descriptor_vectors, axis=1), 1, atol=1e-4)
    new = pair_quality(descriptor_vectors, corpus.groups, copy_descriptor.THRESHOLD)
    assert new.precision >= 0.95 and new.recall >= 0.90, new
    old_file = tmp_path_factory.mktemp("old") / "grey_thumbnail.pt"
    write_copy_detection_model(old_file)
    old_spec = ModelSpec(arch="torchscript", weights=str(old_file), image_size=112, resize_size=128)
    old = pair_quality(embed_corpus(corpus, old_spec), corpus.groups, 0.6)
    assert old.precision < 0.95 or old.recall < 0.90, old  # the corpus tells the two apart


def test_pair_quality_counts_pairs():
    groups = np.array([0, 0, 1, 2])
    v = normalize(np.array([[1.0, 0], [1.0, 0.1], [1.0, 0.05], [0, 1.0]]))
    q = pair_quality(v, groups, threshold=0.99)
    # Pairs above 0.99: (0,1), (0,2), (1,2); one of them is a copy pair.
    assert (q.copy_pairs, q.predicted_pairs) == (1, 3)
    assert q.precision == pytest.approx(1 / 3) and q.recall == 1.0


# ---------------------------------------------------------------- chaining


def _chain_pool(length: int = 12, others: int = 150, step_cos: float = 0.75):
    """A chain x0 ~ x1 ~ ... (each link cosine `step_cos`, ends near orthogonal) and random others."""
    rng = np.random.default_rng(0)
    dim = 64
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    chain = [basis[0]]
    for i in range(1, length):
        chain.append(step_cos * chain[-1] + np.sqrt(1 - step_cos**2) * basis[i])
    rest = normalize(rng.standard_normal((others, dim)) @ basis[length:].T @ basis[length:])
    return normalize(np.vstack([np.array(chain), rest]).astype(np.float32)), length


def test_chain_is_one_component_but_leader_keeps_every_other_link():
    x, length = _chain_pool()
    sims = x[:length] @ x[:length].T
    assert sims[0, length - 1] < 0.1 and all(sims[i, i + 1] > 0.6 > sims[i, i + 2] for i in range(length - 2))
    ids = np.arange(x.shape[0], dtype=np.int64)
    comp = dedup_pool(ids, x, k=8, threshold=0.6, grouping="components")
    assert comp.keep[:length].sum() == 1  # union-find drops A and L together
    lead = dedup_pool(ids, x, k=8, threshold=0.6, grouping="leader")
    assert lead.keep[:length].tolist() == [i % 2 == 0 for i in range(length)]
    dropped = np.flatnonzero(~lead.keep)
    assert dropped.tolist() == list(range(1, length, 2))
    # Every dropped image is dropped for its own copy edge to a kept image.
    assert lead.keep[lead.duplicate_of[dropped]].all()
    assert (np.einsum("ij,ij->i", x[dropped], x[lead.duplicate_of[dropped]]) > 0.6).all()
    assert lead.keep[length:].all() and comp.keep[length:].all()


def test_large_component_warns_in_log_and_summary(caplog):
    x, length = _chain_pool()
    ids = np.arange(x.shape[0], dtype=np.int64)
    edges = copy_detection_edges(x, ids=ids, k=8, threshold=0.6)
    nodes = graph_nodes(edges.src, edges.dst)
    none = np.zeros(0, np.int64)
    decisions = component_decisions(
        nodes, None, none, none, edges.src, edges.dst, none, "smallest_id", "leader"
    )
    summary = DedupSummary(images=x.shape[0], grouping="leader")
    with caplog.at_level(logging.WARNING, logger="lvd"):
        _record_components(summary, decisions, max_share=0.05)
    assert summary.largest_component == length and summary.components == 1
    assert summary.largest_component_share == pytest.approx(length / x.shape[0])
    assert summary.component_sizes == {"8-15": 1}
    assert len(summary.warnings) == 1 and "dedup.max_component_share" in summary.warnings[0]
    assert any("dedup.max_component_share" in r.getMessage() for r in caplog.records)
    quiet = DedupSummary(images=x.shape[0], grouping="leader")
    _record_components(quiet, decisions, max_share=0.1)
    assert quiet.warnings == [] and quiet.largest_component == length


def test_max_component_share_is_validated_by_name():
    base = MINIMAL_SPEC
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="dedup.max_component_share"):
            parse_job_spec({**base, "dedup": {"max_component_share": bad}})
    with pytest.raises(ValueError, match="dedup.grouping"):
        parse_job_spec({**base, "dedup": {"grouping": "cliques"}})


# ---------------------------------------------------------------- a job on the real-image corpus


@pytest.fixture(scope="module")
def corpus_job(tmp_path_factory, ray_local, corpus):
    root = tmp_path_factory.mktemp("real")
    corpus.write(root / "pool")
    spec = parse_job_spec(
        {
            "name": "real-corpus",
            "output_dir": str(root / "output"),
            "pool": [{"uri": str(root / "pool")}],
            "ingest": {"files_per_part": 64},
            "embedding": {
                "retrieval": {
                    "arch": "vit_tiny_d4",
                    "weights": "random",
                    "image_size": 28,
                    "resize_size": 32,
                },
                "copy_detection": DESCRIPTOR.model_dump(),
            },
            "dedup": {"k": 16, "threshold": copy_descriptor.THRESHOLD, "verify_from": VERIFY_FROM},
            "sampling": {"target_size": 50},
            "ray": {"num_cpus": 2},
        }
    )
    reports = run_job(spec, until="dedup")
    return spec, reports


def test_job_on_real_images_collapses_copy_groups_without_chaining(corpus_job, corpus):
    spec, reports = corpus_job
    summary = reports[-1].summary
    assert reports[-1].name == "dedup" and summary.detector.startswith("copy_descriptor")
    images = layout.read_table(spec.output_dir, layout.IMAGES).filter(pc.equal(pc.field("status"), "ok"))
    dedup = layout.read_table(spec.output_dir, layout.DEDUP)
    group_of = {im.name: im.group for im in corpus.images}
    name_of = dict(
        zip(images["image_id"].to_pylist(), (Path(u).name for u in images["uri"].to_pylist()), strict=True)
    )
    ids = dedup["image_id"].to_numpy()
    assert sorted(name_of[i] for i in ids) == sorted(group_of)  # every corpus image was deduped
    groups = np.array([group_of[name_of[i]] for i in ids])
    keep = dedup["keep"].to_numpy(zero_copy_only=False)
    _, sizes = np.unique(dedup["component_id"].to_numpy(), return_counts=True)
    assert sizes.max() <= 0.05 * ids.size
    assert summary.largest_component == sizes.max() and summary.warnings == []
    kept_per_group = np.bincount(groups[keep], minlength=groups.max() + 1)[np.unique(groups)]
    assert (kept_per_group >= 1).all()  # no picture lost entirely
    copy_groups = np.bincount(groups)[np.unique(groups)] >= 2
    # Pixel verification brought in the near misses (rotated and cropped texture copies): every
    # planted copy group keeps exactly one image.
    assert (kept_per_group[copy_groups] == 1).all()
    # An image dropped for another group's image is only ever a far-apart crop of the same large
    # picture (crops of a rocket or a star field above the threshold, which verification does not see).
    name_of_id = {i: name_of[i] for i in ids.tolist()}
    duplicate_of = pc.fill_null(dedup["duplicate_of"], -1).to_numpy()
    group_of_id = dict(zip(ids.tolist(), groups.tolist(), strict=True))
    for i, d in zip(ids[~keep].tolist(), duplicate_of[~keep].tolist(), strict=True):
        if group_of_id[d] != group_of_id[i]:
            source = name_of_id[i].split("-crop")[0]
            assert "-crop" in name_of_id[i] and name_of_id[d].split("-crop")[0] == source, (
                name_of_id[i],
                name_of_id[d],
            )
    assert 0 < summary.verified_copies < summary.verified_pairs and summary.verify_unreadable == 0


def test_calibrate_counts_pairs_per_bin_and_writes_examples(corpus_job, tmp_path):
    from typer.testing import CliRunner

    from lvd.curation.stage_io import load_vectors
    from lvd.jobs.calibrate import THUMB, calibrate
    from lvd.jobs.cli import app

    spec, _ = corpus_job
    n = len(layout.read_table(spec.output_dir, layout.DEDUP))
    model, bins = calibrate(spec.output_dir, tmp_path / "cal", low=0.5, high=1.0, step=0.1, examples=2, k=n)
    assert model == layout.COPY_DETECTION
    embed_parts = layout.list_parts(layout.table_dir(spec.output_dir, layout.EMBEDDINGS), model)
    ids = layout.read_table(spec.output_dir, layout.DEDUP)["image_id"].to_numpy()
    _, vectors = load_vectors(embed_parts, model, ids)
    sims = (vectors @ vectors.T)[np.triu_indices(n, 1)]
    expected, _ = np.histogram(sims, bins=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0 + 1e-6])
    assert [b.pairs for b in bins] == expected.tolist()
    for b in bins:
        assert len(b.examples) == min(2, b.pairs)
        for png in b.examples:
            with Image.open(png) as im:
                assert im.size == (2 * THUMB + 12, THUMB + 24)
    result = CliRunner().invoke(app, ["dedup", "calibrate", spec.output_dir, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "copy_detection vectors" in result.output and "[0.80, 0.85)" in result.output


# ---------------------------------------------------------------- pixel verification


def _image_bytes(img: Image.Image, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_pixel_verifier_finds_edited_copies_but_not_other_crops_of_a_random_texture():
    photo = load_packaged_image("skimage", "coffee.png")
    w, h = photo.size
    cropped = photo.crop((int(0.1 * w), int(0.05 * h), int(0.95 * w), int(0.9 * h)))
    turned = cropped.rotate(5, Image.Resampling.BICUBIC).crop(
        (20, 20, cropped.width - 20, cropped.height - 20)
    )
    mirrored = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((w // 2, h // 2))
    # A random texture: its far-apart crops share no pixels. (A strongly periodic one, such as the
    # brick wall, aligns with itself and can pass: verification is for near misses, not a veto.)
    gravel = load_packaged_image("skimage", "gravel.png")
    bw, bh = gravel.size
    images = [
        _image_bytes(photo, 92),
        _image_bytes(turned, 40),
        _image_bytes(mirrored, 70),
        _image_bytes(gravel.crop((0, 0, bw // 2, bh // 2))),
        _image_bytes(gravel.crop((bw // 2, bh // 2, bw, bh))),
        b"not an image",
    ]
    scores, failed = verify_pairs([(0, 1), (0, 2), (3, 4), (0, 3), (0, 5)], lambda k: images[k])
    cut = DedupSpec().verify_score
    assert scores[0] > cut and scores[1] > cut  # rotated deep crop at JPEG 40; mirrored half size
    assert scores[2] < cut and scores[3] < cut  # far-apart crops of one texture; unrelated pictures
    assert scores[4] == -1 and failed == 1  # unreadable bytes: counted, the pair stays apart


def test_verified_edges_keep_the_edges_above_the_threshold_and_the_passed_band_pairs():
    edges = pa.table(
        {
            "src": np.array([1, 2, 5, 7, 9], np.int64),
            "dst": np.array([2, 1, 6, 5, 3], np.int64),
            "sim": np.array([0.9, 0.9, 0.8, 0.75, 0.7], np.float32),
        }
    )
    pairs = band_pairs(edges["src"].to_numpy(), edges["dst"].to_numpy(), edges["sim"].to_numpy(), 0.84)
    assert pairs.tolist() == [[3, 9], [5, 6], [5, 7]]  # each band pair once, smaller id first
    kept = verified_edges(edges, 0.84, pairs, np.array([False, True, False]))
    assert list(zip(kept["src"].to_pylist(), kept["dst"].to_pylist(), strict=True)) == [
        (1, 2),
        (2, 1),
        (5, 6),
    ]


def test_verification_band_is_validated_and_leaves_other_fingerprints_alone():
    base = MINIMAL_SPEC
    with pytest.raises(ValueError, match="dedup.verify_from"):
        parse_job_spec({**base, "dedup": {"threshold": 0.6, "verify_from": 0.6}})
    plain = parse_job_spec(base)
    # A job run before the verification and tables fields existed keeps its dedup fingerprint (no rerun).
    added = ("verify_from", "verify_score", "tables")
    before = {k: v for k, v in plain.model_dump(mode="json")["dedup"].items() if k not in added}
    blob = json.dumps({"dedup": before}, sort_keys=True).encode()
    assert plain.fingerprint("dedup") == hashlib.sha256(blob).hexdigest()[:16]
    banded = parse_job_spec({**base, "dedup": {"verify_from": 0.5}})
    assert plain.fingerprint("dedup") != banded.fingerprint("dedup")
