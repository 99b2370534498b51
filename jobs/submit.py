"""Submitting a job to a running Ray cluster through the Ray Jobs API, and following it.

A curation job: the resolved job spec travels in the job's `working_dir` (uploaded by Ray), so the
cluster needs lvd installed (the docker image) but no shared copy of the YAML. Paths inside the spec
must be reachable from the cluster (shared storage or fsspec URLs).

A pretraining run: `lvd pretrain` with the given arguments runs as the job's entrypoint on the
cluster (with `--ray-workers N` it fans out to Ray Train workers of that cluster); a config YAML
travels in the `working_dir` the same way.

Token authentication: every request carries the cluster's token when one is set up here
(RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; see
`lvd.jobs.engines.cluster_auth_env`). A cluster with token auth refuses requests without it.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import yaml

from lvd.schemas.job_spec import JobSpec

FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class JobNotFoundError(LookupError):
    """No job with this id on the cluster."""


def _client(address: str):
    from lvd.jobs.engines import cluster_auth_env, local_env_defaults

    local_env_defaults()
    cluster_auth_env()  # before Ray reads the mode: requests carry the token when there is one
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _missing_job(err: Exception, job_id: str) -> Exception:
    """The Jobs API's 404 as a JobNotFoundError naming the id; other errors as they are."""
    text = str(err)
    if "404" in text or "does not exist" in text:
        return JobNotFoundError(f"no job {job_id!r} on this cluster")
    return err


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
    client = _client(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(client, job_id)
        if status in FINAL_STATES:
            return status
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")


def follow_job(job_id: str, address: str, out: TextIO | None = None) -> str:
    """Write the job's log to `out` (stdout) as it grows, until the job ends; returns its final status.

    The log is streamed from the Jobs API (the stream ends with the job); if the stream drops
    earlier, the status and the log are polled until the job ends.
    """
    out = out or sys.stdout
    client = _client(address)
    _status(client, job_id)  # an unknown id fails here, naming it
    written = 0  # characters of the log already written

    def write_new(log: str) -> None:
        nonlocal written
        if len(log) > written:
            out.write(log[written:])
            out.flush()
            written = len(log)

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - a dropped stream: the polling below carries on
        pass
    while (status := _status(client, job_id)) not in FINAL_STATES:
        time.sleep(1.0)
        write_new(client.get_job_logs(job_id))
    write_new(client.get_job_logs(job_id))
    return status


def _status(client, job_id: str) -> str:
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as err:
        raise _missing_job(err, job_id) from None


def job_status(job_id: str, address: str) -> str:
    return _status(_client(address), job_id)


def job_logs(job_id: str, address: str) -> str:
    client = _client(address)
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as err:
        raise _missing_job(err, job_id) from None


def stop_job(job_id: str, address: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    client = _client(address)
    try:
        return bool(client.stop_job(job_id))
    except RuntimeError as err:
        raise _missing_job(err, job_id) from None
