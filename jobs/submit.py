"""Submitting a job to a running Ray cluster through the Ray Jobs API, and following it.

A curation job: the resolved job spec travels in the job's `working_dir` (uploaded by Ray), so the
cluster needs no shared copy of the YAML. Paths inside the spec must be reachable from the cluster
(shared storage or fsspec URLs).

Which lvd runs the job (`decide_shipping`): the Jobs API runs an entrypoint through a shell on the
head, so `python` there is whatever comes first on the PATH `ray start` ran with. A probe job asks that
`python` whether it has Ray and lvd. With lvd installed on the cluster (the docker image) the job runs
with it; without, this client's lvd package travels with the job as a Ray `py_modules` entry, which
every worker of the job (Ray tasks, actors, and Spark's Python workers through PYTHONPATH) imports.
lvd's dependencies (Ray, torch, faiss, pyspark, ...) must be installed on the nodes either way.

A pretraining run: `lvd pretrain` with the given arguments runs as the job's entrypoint on the
cluster (with `--ray-workers N` it fans out to Ray Train workers of that cluster); a config YAML
travels in the `working_dir` the same way.

Token authentication: every request carries the cluster's token when one is set up here
(RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; see
`lvd.jobs.engines.cluster_auth_env`). A cluster with token auth refuses requests without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from lvd.schemas.job_spec import JobSpec

logger = logging.getLogger(__name__)

FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
SHIP_MODES = ("auto", "always", "never")
# The subpackages of the `lvd` namespace: what shipping copies (pyproject.toml lists them, with their
# own subpackages, which travel inside them).
LVD_PACKAGES = ("curation", "embeddings", "jobs", "schemas", "training")
# Set in a shipped job's environment, so its log can say where its lvd came from.
SHIPPED_ENV = "LVD_SHIPPED"
_PROBE_MARK = "lvd-probe "
# Run by the head's `python`: which interpreter it is, its Ray version, whether it has lvd.
_PROBE_CODE = (
    "import importlib.metadata as m, importlib.util as u, json, sys\n"
    "def has(name):\n"
    "    try:\n"
    "        return u.find_spec(name) is not None\n"
    "    except ImportError:\n"
    "        return False\n"
    "ray = m.version('ray') if has('ray') else None\n"
    f"print({_PROBE_MARK!r} + json.dumps({{'python': sys.executable, 'ray': ray, 'lvd': has('lvd.jobs.cli')}}))\n"
)


class JobNotFoundError(LookupError):
    """No job with this id on the cluster."""


def _client(address: str):
    from lvd.jobs.engines import cluster_auth_env, local_env_defaults

    local_env_defaults()
    cluster_auth_env()  # before Ray reads the mode: requests carry the token when there is one
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        raise ConnectionError(
            f"cannot reach a Ray dashboard at {address}: is the cluster up, and is this its dashboard "
            "address (--address http://HEAD:8265)?"
        ) from None


class ClusterPythonError(RuntimeError):
    """The head's `python` cannot run an lvd job."""


@dataclass(frozen=True)
class Shipping:
    """Which lvd a submitted job runs with, and why."""

    ship: bool  # this client's lvd travels with the job
    reason: str  # one line for the user

    def runtime_env(self, working_dir: str, staging: Path) -> dict:
        """The job's Ray runtime environment: `working_dir`, and the lvd package (copied into
        `staging`) as a `py_modules` entry when shipping."""
        env = {"working_dir": working_dir, "env_vars": {"PYTHONUNBUFFERED": "1"}}
        if self.ship:
            env["py_modules"] = [str(stage_lvd_package(staging))]
            env["env_vars"][SHIPPED_ENV] = "1"
        return env


def stage_lvd_package(dest: Path) -> Path:
    """Copy this process's `lvd` package (wherever it is installed from, editable or not) to
    `dest/lvd`, without bytecode; returns that folder."""
    root = dest / "lvd"
    for name in LVD_PACKAGES:
        # find_spec: the package's folder without running its __init__ (lvd.training would import torch).
        src = Path(importlib.util.find_spec(f"lvd.{name}").submodule_search_locations[0])
        shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def probe_cluster_python(address: str, timeout: float = 120.0) -> dict:
    """Run a tiny job on the cluster: the head's `python` reports its path, Ray version and whether
    it imports lvd. The probe job is deleted afterwards."""
    client = _client(address)
    probe_id = f"lvd-probe-{uuid.uuid4().hex[:8]}"
    client.submit_job(entrypoint=shlex.join(["python", "-c", _PROBE_CODE]), submission_id=probe_id)
    try:
        deadline = time.monotonic() + timeout
        while (status := _status(client, probe_id)) not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise ClusterPythonError(f"the probe job {probe_id} did not end within {timeout:.0f} s")
            time.sleep(0.25)
        log = client.get_job_logs(probe_id)
        found = [line for line in log.splitlines() if line.startswith(_PROBE_MARK)]
        if status != "SUCCEEDED" or not found:
            tail = " | ".join(log.strip().splitlines()[-3:])
            raise ClusterPythonError(f"`python` on the cluster's head did not run ({status}): {tail}")
        return json.loads(found[-1][len(_PROBE_MARK) :])
    finally:
        try:
            client.delete_job(probe_id)
        except Exception:  # noqa: BLE001 - a leftover probe entry in the job list is harmless
            pass


def decide_shipping(address: str, mode: str = "auto") -> Shipping:
    """always / never: as said. auto: probe the head's `python`; ship unless it has lvd.

    A head whose `python` has no Ray cannot run any job entrypoint of ours: that is an error naming it.
    """
    if mode not in SHIP_MODES:
        raise ValueError(f"ship mode {mode!r}: use one of {', '.join(SHIP_MODES)}")
    if mode == "always":
        return Shipping(True, "shipping this lvd with the job (--ship always)")
    if mode == "never":
        return Shipping(False, "running the job with the cluster's lvd (--ship never)")
    found = probe_cluster_python(address)
    python = found["python"]
    if not found["ray"]:
        raise ClusterPythonError(
            f"`python` on the cluster's head ({python}) has no Ray: put the Python environment that "
            "runs Ray first on the PATH of `ray start`"
        )
    if found["lvd"]:
        return Shipping(False, f"running the job with the cluster's lvd ({python})")
    return Shipping(True, f"the cluster's python ({python}) has no lvd: shipping this lvd with the job")


def _missing_job(err: Exception, job_id: str) -> Exception:
    """The Jobs API's 404 as a JobNotFoundError naming the id; other errors as they are."""
    text = str(err)
    if "404" in text or "does not exist" in text:
        return JobNotFoundError(f"no job {job_id!r} on this cluster")
    return err


def submit_job(
    spec: JobSpec,
    address: str,
    wait: bool = False,
    extra_args: str = "",
    shipping: Shipping | None = None,
) -> str:
    """Submit `lvd run` of this spec to the cluster at `address`; returns the submission id.

    `shipping`: which lvd runs it (default: `decide_shipping(address)`)."""
    shipping = shipping or decide_shipping(address)
    client = _client(address)
    submission_id = f"lvd-{spec.name}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="lvd-submit-") as tmp, tempfile.TemporaryDirectory() as staging:
        (Path(tmp) / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        client.submit_job(
            entrypoint=f"python -m lvd.jobs.cli run job.yaml {extra_args}".strip(),
            submission_id=submission_id,
            runtime_env=shipping.runtime_env(tmp, Path(staging)),
            metadata={"lvd_job": spec.name, "output_dir": spec.output_dir, "lvd_shipped": str(shipping.ship)},
        )
    logger.info("submitted %s: %s", submission_id, shipping.reason)
    if wait:
        wait_for_job(submission_id, address)
    return submission_id


def submit_pretrain(
    pretrain_args: Sequence[str],
    address: str,
    *,
    config_file: Path | None = None,
    metadata: dict[str, str] | None = None,
    shipping: Shipping | None = None,
) -> str:
    """Submit `lvd pretrain PRETRAIN_ARGS` to the cluster at `address`; returns the submission id.

    The entrypoint runs the cluster's own interpreter (`python -m lvd.jobs.cli pretrain ...`). Paths
    in the arguments must be valid on the cluster. `config_file` (a local YAML) is uploaded with
    the job; refer to it in the arguments by its file name. `shipping` as for `submit_job`.
    """
    shipping = shipping or decide_shipping(address)
    client = _client(address)
    submission_id = f"lvd-pretrain-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="lvd-submit-") as tmp, tempfile.TemporaryDirectory() as staging:
        if config_file is not None:
            shutil.copy(config_file, Path(tmp) / config_file.name)
        client.submit_job(
            entrypoint=shlex.join(["python", "-m", "lvd.jobs.cli", "pretrain", *pretrain_args]),
            submission_id=submission_id,
            runtime_env=shipping.runtime_env(tmp, Path(staging)),
            metadata={"lvd_pretrain": "1", "lvd_shipped": str(shipping.ship), **(metadata or {})},
        )
    logger.info("submitted %s: %s", submission_id, shipping.reason)
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
