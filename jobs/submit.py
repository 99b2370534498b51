"""Submitting a job to a running Ray cluster through the Ray Jobs API, and following it.

A curation job: the resolved job spec travels in the job's `working_dir` (uploaded by Ray), so the
cluster needs lvd installed (the docker image) but no shared copy of the YAML. Paths inside the spec
must be reachable from the cluster (shared storage or fsspec URLs).

A pretraining run: `lvd pretrain` with the given arguments runs as the job's entrypoint on the
cluster (with `--ray-workers N` it fans out to Ray Train workers of that cluster); a config YAML
travels in the `working_dir` the same way.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import yaml

from lvd.schemas.job_spec import JobSpec


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit_job(spec: JobSpec, address: str, wait: bool = False, extra_args: str = "") -> str:
    """Submit `lvd run` of this spec to the cluster at `address`; returns the submission id."""
    client = _client(address)
    submission_id = f"lvd-{spec.name}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="lvd-submit-") as tmp:
        (Path(tmp) / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        client.submit_job(
            entrypoint=f"python -m lvd.jobs.cli run job.yaml {extra_args}".strip(),
            submission_id=submission_id,
            runtime_env={"working_dir": tmp, "env_vars": {"PYTHONUNBUFFERED": "1"}},
            metadata={"lvd_job": spec.name, "output_dir": spec.output_dir},
        )
    if wait:
        wait_for_job(submission_id, address)
    return submission_id


def submit_pretrain(
    pretrain_args: Sequence[str],
    address: str,
    *,
    config_file: Path | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit `lvd pretrain PRETRAIN_ARGS` to the cluster at `address`; returns the submission id.

    The entrypoint runs the cluster's own interpreter (`python -m lvd.jobs.cli pretrain ...`). Paths
    in the arguments must be valid on the cluster. `config_file` (a local YAML) is uploaded with
    the job; refer to it in the arguments by its file name.
    """
    client = _client(address)
    submission_id = f"lvd-pretrain-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="lvd-submit-") as tmp:
        if config_file is not None:
            shutil.copy(config_file, Path(tmp) / config_file.name)
        client.submit_job(
            entrypoint=shlex.join(["python", "-m", "lvd.jobs.cli", "pretrain", *pretrain_args]),
            submission_id=submission_id,
            runtime_env={"working_dir": tmp, "env_vars": {"PYTHONUNBUFFERED": "1"}},
            metadata={"lvd_pretrain": "1", **(metadata or {})},
        )
    return submission_id


def wait_for_job(job_id: str, address: str, timeout: float = 3600.0, poll: float = 1.0) -> str:
    """Block until the job ends; returns its final status name."""
    from ray.job_submission import JobStatus

    client = _client(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status.value)
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")


def job_status(job_id: str, address: str) -> str:
    return str(_client(address).get_job_status(job_id).value)


def job_logs(job_id: str, address: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop_job(job_id: str, address: str) -> bool:
    return bool(_client(address).stop_job(job_id))
