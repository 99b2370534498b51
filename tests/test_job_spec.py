import json

import pytest
import yaml

from lvd.schemas.job_spec import JobSpecError, load_job_spec, parse_job_spec

MINIMAL = {
    "name": "t",
    "output_dir": "out",
    "pool": [{"uri": "pool/"}],
    "seeds": [{"name": "s", "sources": [{"uri": "seed/"}], "strategy": "sample"}],
}


def _with(**changes):
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    return data


def test_minimal_spec_gets_lvd_defaults():
    spec = parse_job_spec(MINIMAL)
    assert spec.dedup.k == 64 and spec.dedup.threshold == 0.6 and spec.dedup.eval_threshold == 0.45
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
