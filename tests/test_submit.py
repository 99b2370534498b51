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
