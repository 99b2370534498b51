"""`lvd submit` through the Ray Jobs API to a real `ray start --head` on 127.0.0.1."""

import json
import subprocess
import sys
from pathlib import Path

from ray_head import head_env, ray_head

from lvd.jobs.demo import build_demo
from lvd.jobs.submit import job_logs, job_status, stop_job, submit_job, wait_for_job
from lvd.schemas.job_spec import load_job_spec


def _lvd(*args: str) -> str:
    cmd = [str(Path(sys.executable).parent / "lvd"), *args]
    return subprocess.run(
        cmd, env=head_env(), capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_submit_runs_the_job_on_the_cluster_and_cli_follows_it(tmp_path):
    job_yaml = build_demo(tmp_path / "demo", n_images=120)
    spec = load_job_spec(job_yaml)
    with ray_head() as address:
        job_id = _lvd("submit", str(job_yaml), "--address", address)
        assert job_id.startswith("lvd-")
        assert wait_for_job(job_id, address, timeout=600) == "SUCCEEDED", job_logs(job_id, address)[-3000:]
        assert _lvd("status", job_id, "--address", address) == "SUCCEEDED"
        assert "funnel:" in _lvd("logs", job_id, "--address", address)
        index = json.loads((Path(spec.output_dir) / "shards" / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) > 0

        # A second job, stopped while it runs.
        spec.output_dir = str(tmp_path / "second")
        second = submit_job(spec, address=address)
        assert job_status(second, address) in {"PENDING", "RUNNING"}
        assert stop_job(second, address)
        assert wait_for_job(second, address, timeout=60) == "STOPPED"


def test_submit_pretrain_checks_options_and_sends_paths_the_cluster_can_open(tmp_path, monkeypatch):
    """`lvd submit-pretrain` parses `lvd pretrain`'s options before submitting, makes local paths
    absolute and uploads a config file; the real submission runs in test_multinode."""
    import typer
    from typer.testing import CliRunner

    from lvd.jobs.cli import app

    sent: list[dict] = []

    def fake_submit(args, address, *, config_file=None, metadata=None):
        sent.append({"args": args, "address": address, "config_file": config_file})
        return "lvd-pretrain-0"

    monkeypatch.setattr("lvd.jobs.submit.submit_pretrain", fake_submit)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "small.yaml"
    config.write_text("train: {batch_size_per_gpu: 4}\n")
    runner = CliRunner()
    common = ["submit-pretrain", "--address", "http://head:8265", "--from-job", "out"]
    result = runner.invoke(
        app, [*common, "--config", "small.yaml", "--output", "run", "--ray-workers", "2", "--no-resume"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "lvd-pretrain-0"
    (call,) = sent
    args = call["args"]
    value = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and i + 1 < len(args)}
    assert call["address"] == "http://head:8265"
    assert value["--from-job"] == str(tmp_path / "out") and value["--output"] == str(tmp_path / "run")
    assert value["--config"] == "small.yaml" and call["config_file"] == config  # uploaded, named as uploaded
    assert value["--ray-workers"] == "2" and "--no-resume" in args and "--gpu" not in args
    # What the cluster will run parses as `lvd pretrain` arguments.
    typer.main.get_command(app).commands["pretrain"].make_context("lvd pretrain", list(args))

    # A built-in config name goes as it is; nothing is submitted for a bad option or without --output.
    runner.invoke(app, [*common, "--config", "tiny", "--output", "run"])
    assert sent[-1]["config_file"] is None and "tiny" in sent[-1]["args"]
    assert runner.invoke(app, [*common, "--output", "run", "--no-such-option"]).exit_code == 2
    assert runner.invoke(app, common).exit_code == 2
    assert len(sent) == 2
