"""Submitting a job to a running Ray cluster through the Ray Jobs API, and following it.

The resolved job spec travels in the job's `working_dir` (uploaded by Ray), so the cluster
needs lvd installed (the docker image) but no shared copy of the YAML. Paths inside the spec
must be reachable from the cluster (shared storage or fsspec URLs).
"""

from __future__ import annotations

import tempfile
import time
import uuid
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
