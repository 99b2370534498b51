import json

import pytest
import yaml

from lvd.schemas.job_spec import JobSpecError, load_job_spec, parse_job_spec

MINIMAL = {
    "name": "t",
    "output_dir": "out",
    "pool": [{"uri": "pool/"}],
    "seeds": [{"name": "s", "sources": [{"uri": "seed/"}], "strategy": "sample"}],
    "embedding": {"retrieval": {"weights": "random"}},
}


def _with(**changes):
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    return data


def test_minimal_spec_gets_lvd_defaults():
    spec = parse_job_spec(MINIMAL)
    # No copy detector named: the built-in one at the size it was measured at, and its thresholds.
    detector = spec.embedding.copy_detection
    assert (detector.arch, detector.weights, detector.image_size, detector.resize_size) == (
        "copy_descriptor", None, 128, 128
    )  # fmt: skip
    assert spec.dedup.k == 64 and spec.dedup.threshold == 0.84 and spec.dedup.eval_threshold == 0.84
    assert spec.seeds[0].k == 4
    assert spec.seeds[0].min_seed_images == 3 and spec.seeds[0].images_per_cluster == 10_000
    assert spec.seeds[0].max_images == 1_000_000


@pytest.mark.parametrize(
    "data, field, words",
    [
        (
            _with(seeds=[{"name": "s", "sources": [{"uri": "x"}], "strategy": "nearest"}]),
            "seeds.0.strategy",
            "as_is",
        ),
        (_with(dedup={"threshold": 1.5}), "dedup.threshold", "less than or equal to 1"),
        (_with(clustering={"levels": [{"k": 10}, {"k": 50}]}), "clustering.levels", "must decrease"),
        (_with(pool=[]), "pool", "at least 1"),
        (_with(shards={"samples_per_shard": 0}), "shards.samples_per_shard", "greater than or equal to 1"),
        (_with(embedding={"retrieval": {"dtype": "int8"}}), "embedding.retrieval.dtype", "float16"),
        (_with(dedupe={"k": 3}), "dedupe", "unknown field"),
        (_with(seeds=[], sampling={"target_size": 0}), "nothing to curate", "seeds"),
    ],
)
def test_bad_spec_names_the_field_and_allowed_values(data, field, words):
    with pytest.raises(JobSpecError) as err:
        parse_job_spec(data)
    msg = str(err.value)
    assert field in msg and words in msg


def test_load_resolves_paths_against_the_yaml_folder(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(MINIMAL))
    spec = load_job_spec(tmp_path / "job.yaml")
    assert spec.output_dir == str(tmp_path / "out")
    assert spec.pool[0].uri == str(tmp_path / "pool")


def test_unreadable_yaml_is_a_spec_error(tmp_path):
    (tmp_path / "job.yaml").write_text("name: [unclosed")
    with pytest.raises(JobSpecError, match="cannot read job spec"):
        load_job_spec(tmp_path / "job.yaml")


def test_fingerprint_changes_only_with_its_sections():
    a = parse_job_spec(MINIMAL)
    b = parse_job_spec(_with(dedup={"k": 8}))
    assert a.fingerprint("dedup") != b.fingerprint("dedup")
    assert a.fingerprint("clustering") == b.fingerprint("clustering")


# ---------------------------------------------------------------------------------------------
# Weights, output folders and inputs: named before any work


def test_weights_must_be_named_random_is_an_explicit_opt_in():
    data = _with()
    del data["embedding"]
    with pytest.raises(JobSpecError, match=r"embedding\.retrieval\.weights is required.*'random'"):
        parse_job_spec(data)
    copy = _with(embedding={"retrieval": {"weights": "random"}, "copy_detection": {"arch": "vit_small"}})
    with pytest.raises(JobSpecError, match=r"embedding\.copy_detection\.weights is required"):
        parse_job_spec(copy)
    spec = parse_job_spec(MINIMAL)
    assert spec.embedding.retrieval.random_init
    real = parse_job_spec(_with(embedding={"retrieval": {"weights": "/models/w.pth"}}))
    assert not real.embedding.retrieval.random_init


@pytest.mark.parametrize(
    "retrieval, words",
    [
        ({"weights": "https://x/w.pth", "sha256": "abc"}, "embedding.retrieval.sha256"),
        ({"weights": "random", "sha256": "a" * 64}, "sha256 is given but weights is not a file"),
        ({"weights": "random", "arch": "torchscript"}, "needs weights"),
    ],
)
def test_bad_weights_fields_are_named(retrieval, words):
    with pytest.raises(JobSpecError) as err:
        parse_job_spec(_with(embedding={"retrieval": retrieval}))
    assert words in str(err.value)


@pytest.mark.parametrize("uri", ["s3://bucket/out", "gs://bucket/out", "hdfs://nn/out"])
def test_non_local_output_dir_is_rejected_naming_the_field(uri):
    with pytest.raises(JobSpecError) as err:
        parse_job_spec(_with(output_dir=uri))
    msg = str(err.value)
    assert "output_dir" in msg and uri in msg and "only local folders" in msg


def test_file_url_output_dir_is_a_local_folder(tmp_path):
    assert parse_job_spec(_with(output_dir=f"file://{tmp_path}/out")).output_dir == f"{tmp_path}/out"


def test_ingest_limits_have_defaults():
    spec = parse_job_spec(MINIMAL)
    assert spec.ingest.min_side == 32 and spec.ingest.max_aspect_ratio == 20.0
    with pytest.raises(JobSpecError, match="ingest.max_aspect_ratio"):
        parse_job_spec(_with(ingest={"max_aspect_ratio": 0.5}))


def _job_yaml(tmp_path, **changes) -> str:
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "job.yaml")


def test_validate_names_every_missing_input_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from lvd.embeddings.checkpoints import save_lvd_backbone
    from lvd.embeddings.vit import build_vit
    from lvd.jobs.cli import app
    from lvd.jobs.preflight import input_problems

    job = _job_yaml(
        tmp_path,
        embedding={
            "retrieval": {"arch": "vit_tiny", "weights": "models/missing.pth"},
            "copy_detection": {"arch": "torchscript", "weights": "https://example.invalid/sscd.pt"},
        },
    )
    result = CliRunner().invoke(app, ["validate", job])
    assert result.exit_code == 2
    out = result.output
    assert f"pool source {str(tmp_path / 'pool')!r}: no such file or folder" in out
    assert f"seed set 's' source {str(tmp_path / 'seed')!r}: no such file or folder" in out
    assert (
        f"embedding.retrieval.weights: no such file or folder: {tmp_path / 'models' / 'missing.pth'}" in out
    )
    assert "sscd.pt" not in out  # a URL is fetched (and checked against its sha256) when loaded
    assert not (tmp_path / "out").exists()

    for name in ("pool", "seed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(b"not read by validate")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "missing.pth").write_bytes(b"")
    result = CliRunner().invoke(app, ["validate", job])  # a weights file is loaded as the embed stage would
    assert result.exit_code == 2
    assert (
        f"embedding.retrieval.weights: {tmp_path / 'models' / 'missing.pth'} is not a checkpoint"
        in result.output
    )
    save_lvd_backbone(build_vit("vit_tiny", img_size=28), tmp_path / "models" / "missing.pth")
    result = CliRunner().invoke(app, ["validate", job])
    assert result.exit_code == 0, result.output
    assert "ok: job 't'" in result.output
    assert input_problems(load_job_spec(job)) == []


def test_run_validates_inputs_first(tmp_path):
    from typer.testing import CliRunner

    from lvd.jobs.cli import app

    result = CliRunner().invoke(app, ["run", _job_yaml(tmp_path)])
    assert result.exit_code == 2 and "no such file or folder" in result.output
    assert not (tmp_path / "out").exists()  # nothing started: no output folder


@pytest.mark.parametrize(
    "copy_detection, dedup, expected",
    [
        ("unset", {}, (0.84, 0.84)),  # the built-in copy_descriptor
        ("unset", {"threshold": 0.7}, (0.7, 0.84)),
        (None, {}, (0.6, 0.45)),  # null: the retrieval vectors, the paper's values
        ({"arch": "torchscript", "weights": "sscd.pt"}, {}, (0.6, 0.45)),
        ({"arch": "copy_descriptor", "image_size": 128, "resize_size": 128}, {}, (0.84, 0.84)),
        ({"arch": "copy_descriptor", "image_size": 128, "resize_size": 128}, {"threshold": 0.9}, (0.9, 0.84)),
        ({"arch": "torchscript", "weights": "sscd.pt"}, {"eval_threshold": 0.5}, (0.6, 0.5)),
    ],
)
def test_unset_dedup_thresholds_follow_the_copy_detector(copy_detection, dedup, expected):
    embedding = {"retrieval": {"weights": "random"}}
    if copy_detection != "unset":
        embedding["copy_detection"] = copy_detection
    spec = parse_job_spec(_with(embedding=embedding, dedup=dedup))
    assert (spec.dedup.threshold, spec.dedup.eval_threshold) == expected
    # The resolved values and the detector (null included) survive a round trip, so a stage's
    # fingerprint does not move on a rerun.
    again = parse_job_spec(spec.model_dump(mode="json"))
    assert again.embedding.copy_detection == spec.embedding.copy_detection
    assert again.fingerprint("dedup") == spec.fingerprint("dedup")
    assert again.fingerprint("embedding") == spec.fingerprint("embedding")


def test_bad_threshold_is_named_with_a_copy_descriptor():
    embedding = {"retrieval": {"weights": "random"}, "copy_detection": {"arch": "copy_descriptor"}}
    with pytest.raises(JobSpecError, match="dedup.eval_threshold"):
        parse_job_spec(_with(embedding=embedding, dedup={"eval_threshold": -2}))
