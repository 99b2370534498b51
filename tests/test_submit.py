"""`lvd submit` through the Ray Jobs API to a real `ray start --head` on 127.0.0.1, with token auth."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from ray_head import free_ports, head_env, python_without_lvd, ray_cluster

from lvd.jobs.demo import build_demo
from lvd.schemas.job_spec import load_job_spec


def _lvd(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "lvd"), *args]
    out = subprocess.run(cmd, env=env or head_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _client_env(home: Path, token: str | None) -> dict[str, str]:
    """A user's shell: no auth mode chosen, no token file in HOME, the token (if any) in RAY_AUTH_TOKEN."""
    env = {**head_env(token), "HOME": str(home)}
    env.pop("RAY_AUTH_MODE")
    return env


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvd: error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return lines[0]


def test_submit_with_token_auth_streams_the_job_and_exits_as_it_ended(tmp_path):
    """A head with Ray token auth whose `python` has no lvd: requests without the token are refused;
    with RAY_AUTH_TOKEN set, `lvd submit --wait` ships lvd with the job, streams the job's log and
    exits 0 on success, 1 on failure; `lvd stop`, `lvd status` and `lvd logs --follow` say how a
    stopped job ended; mistakes are one line. (A head with lvd installed: test_multinode.)"""
    token = uuid.uuid4().hex
    home = tmp_path / "home"
    home.mkdir()
    job_yaml = build_demo(tmp_path / "demo", n_images=60)
    spec = load_job_spec(job_yaml)
    with_token, without_token = _client_env(home, token), _client_env(home, None)
    python = python_without_lvd(tmp_path / "no-lvd")
    no_lvd = subprocess.run([python, "-c", "import ray, lvd.jobs"], capture_output=True, text=True)
    assert "No module named 'lvd'" in no_lvd.stderr  # Ray imports there, lvd does not
    with ray_cluster(auth_token=token, python=python) as cluster:
        address = cluster.dashboard
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        assert "Authentication" in _one_line_error(
            _lvd("status", "lvd-none", "--address", address, env=without_token, check=False)
        )

        submitted = _lvd("submit", str(job_yaml), "--address", address, "--wait", env=with_token)
        job_id = submitted.stdout.splitlines()[0]
        assert job_id.startswith("lvd-")
        assert "funnel:" in submitted.stdout and "shards written" in submitted.stdout  # the job's log
        assert f"job {job_id}: SUCCEEDED" in submitted.stderr
        assert f"the cluster's python ({python}) has no lvd: shipping" in submitted.stderr
        assert "shipped with this job by `lvd submit`" in submitted.stdout  # the job's log says so
        assert _lvd("status", job_id, "--address", address, env=with_token).stdout.strip() == "SUCCEEDED"
        assert "funnel:" in _lvd("logs", job_id, "--address", address, "--follow", env=with_token).stdout
        index = json.loads((Path(spec.output_dir) / "shards" / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) > 0

        # A job whose spec names a dead Ray address fails on the cluster within the connect timeout.
        (dead_port,) = free_ports(1)
        bad = spec.model_dump(mode="json") | {"output_dir": str(tmp_path / "dead-out")}
        bad["ray"] = {**bad["ray"], "address": f"127.0.0.1:{dead_port}"}
        bad_yaml = tmp_path / "dead.yaml"
        bad_yaml.write_text(yaml.safe_dump(bad))
        t0 = time.monotonic()
        # `--ship always`: no second probe (the one above found no lvd on this head).
        ship = ("--ship", "always")
        failed = _lvd(
            "submit", str(bad_yaml), "--address", address, "--wait", *ship, env=with_token, check=False
        )
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert time.monotonic() - t0 < 120
        assert f"lvd: error: cannot reach the Ray cluster at 127.0.0.1:{dead_port}" in failed.stdout
        assert "Traceback" not in failed.stdout
        failed_id = failed.stdout.splitlines()[0]
        status = _lvd("status", failed_id, "--address", address, env=with_token, check=False)
        assert (status.returncode, status.stdout.strip()) == (1, "FAILED")

        # A job stopped while `lvd logs --follow` streams it.
        second_yaml = tmp_path / "second.yaml"
        second_yaml.write_text(
            yaml.safe_dump(spec.model_dump(mode="json") | {"output_dir": str(tmp_path / "2")})
        )
        second = _lvd("submit", str(second_yaml), "--address", address, *ship, env=with_token).stdout.strip()
        follow = subprocess.Popen(
            [str(Path(sys.executable).parent / "lvd"), "logs", second, "--address", address, "--follow"],
            env=with_token, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert "stop requested" in _lvd("stop", second, "--address", address, env=with_token).stdout
        _, follow_err = follow.communicate(timeout=120)
        assert follow.returncode == 3 and f"job {second}: STOPPED" in follow_err
        status = _lvd("status", second, "--address", address, env=with_token, check=False)
        assert (status.returncode, status.stdout.strip()) == (3, "STOPPED")
        again = _lvd("stop", second, "--address", address, env=with_token).stdout
        assert "not running (STOPPED)" in again

        # Mistakes: an unknown job id, an address nothing listens on.
        assert "no job 'lvd-nope'" in _one_line_error(
            _lvd("status", "lvd-nope", "--address", address, env=with_token, check=False)
        )
        dead = f"http://127.0.0.1:{dead_port}"
        assert dead in _one_line_error(_lvd("logs", job_id, "--address", dead, env=with_token, check=False))


def test_submit_pretrain_checks_options_and_sends_paths_the_cluster_can_open(tmp_path, monkeypatch):
    """`lvd submit-pretrain` parses `lvd pretrain`'s options before submitting, makes local paths
    absolute and uploads a config file; the real submission runs in test_multinode."""
    import typer
    from typer.testing import CliRunner

    from lvd.jobs.cli import app

    sent: list[dict] = []

    def fake_submit(args, address, *, config_file=None, metadata=None, shipping=None):
        sent.append({"args": args, "address": address, "config_file": config_file, "shipping": shipping})
        return "lvd-pretrain-0"

    monkeypatch.setattr("lvd.jobs.submit.submit_pretrain", fake_submit)
    monkeypatch.setattr("lvd.jobs.submit.probe_cluster_python", lambda address: pytest.fail("probed"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "small.yaml"
    config.write_text("train: {batch_size_per_gpu: 4}\n")
    runner = CliRunner()
    common = ["submit-pretrain", "--address", "http://head:8265", "--from-job", "out"]
    result = runner.invoke(
        app,
        [
            *common,
            "--config",
            "small.yaml",
            "--output",
            "run",
            "--ray-workers",
            "2",
            "--no-resume",
            "--ship",
            "never",
        ],
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
    runner.invoke(app, [*common, "--config", "tiny", "--output", "run", "--ship", "always"])
    assert sent[-1]["config_file"] is None and "tiny" in sent[-1]["args"]
    assert [c["shipping"].ship for c in sent] == [False, True]
    assert runner.invoke(app, [*common, "--output", "run", "--no-such-option"]).exit_code == 2
    assert runner.invoke(app, common).exit_code == 2
    assert runner.invoke(app, [*common, "--output", "run", "--ship", "sometimes"]).exit_code == 2
    assert len(sent) == 2


def test_shipped_lvd_package_is_the_one_pyproject_lists(tmp_path):
    """What `submit` ships holds every package pyproject.toml installs, as importable folders."""
    import tomllib

    from lvd.jobs.submit import stage_lvd_package

    root = stage_lvd_package(tmp_path)
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for package in pyproject["tool"]["setuptools"]["packages"]:
        assert (root.parent / package.replace(".", "/") / "__init__.py").is_file(), package
    assert not list(root.rglob("__pycache__"))
    assert (root / "jobs" / "spark-log4j2.properties").is_file()  # data files travel too
