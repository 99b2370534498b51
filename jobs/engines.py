"""Starting (or joining) the engines a job runs on: Ray for ingest/embed, Spark for shards."""

from __future__ import annotations

import logging
import os
import sys

from lvd.schemas.job_spec import JobSpec

log = logging.getLogger("lvd")


def local_env_defaults() -> None:
    """Settings that a local, single-machine run needs (see README: Ray auth, loopback binding)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Spark workers and Ray job entrypoints must run this interpreter, not whatever `python` is first on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    bindir = os.path.dirname(sys.executable)
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def ensure_ray(spec: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    local_env_defaults()
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a submitted Ray job RAY_ADDRESS points at the cluster this job runs on.
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=spec.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log.info("ray: %s", ray.cluster_resources())


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


_spark = None


def get_spark(spec: JobSpec):
    """One SparkSession per process, configured from spec.spark."""
    global _spark
    if _spark is not None:
        return _spark
    local_env_defaults()
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.appName(f"lvd-{spec.name}")
        .master(spec.spark.master)
        .config("spark.driver.memory", spec.spark.driver_memory)
        .config("spark.executor.memory", spec.spark.executor_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.python.worker.reuse", "true")
    )
    if spec.spark.master.startswith("local"):
        # One machine: a few shuffle partitions (a cluster keeps Spark's default; adaptive query
        # execution merges small ones).
        builder = (
            builder.config("spark.sql.shuffle.partitions", "8")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.driver.host", "127.0.0.1")
        )
    for k, v in spec.spark.conf.items():
        builder = builder.config(k, v)
    _spark = builder.getOrCreate()
    _spark.sparkContext.setLogLevel("WARN")
    return _spark


def stop_spark() -> None:
    global _spark
    if _spark is not None:
        _spark.stop()
        _spark = None
