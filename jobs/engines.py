"""Starting (or joining) the engines a job runs on: Ray for ingest/embed, Spark for shards."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lvd.schemas.job_spec import JobSpec

log = logging.getLogger("lvd")

LOOPBACK = "127.0.0.1"
SPARK_LOG4J = Path(__file__).with_name("spark-log4j2.properties")


def local_env_defaults() -> None:
    """Settings that a local, single-machine run needs (see README: Ray auth, loopback binding)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Spark workers and Ray job entrypoints must run this interpreter, not whatever `python` is first on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    bindir = os.path.dirname(sys.executable)
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def ensure_ray(spec: JobSpec) -> None:
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: set it first.
    local_env_defaults()
    import ray

    if ray.is_initialized():
        return
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a submitted Ray job RAY_ADDRESS points at the cluster this job runs on.
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a new instance of our own, never a cluster recorded by an earlier `ray start` (which
        # may be dead); every Ray process of it listens on loopback only.
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            num_cpus=spec.ray.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
        )
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
    if spec.spark.master.startswith("local"):
        # Not for a cluster master: executors on other hosts must reach the driver at a routable address.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.appName(f"lvd-{spec.name}")
        .master(spec.spark.master)
        .config("spark.driver.memory", spec.spark.driver_memory)
        .config("spark.executor.memory", spec.spark.executor_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.python.worker.reuse", "true")
        # Replaces Spark's default log4j profile and its start-up banner (spec.spark.conf may override).
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{SPARK_LOG4J}")
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


def collect_with_progress(spark, rdd, progress) -> list:
    """`rdd.collect()`, logging `progress` (a `jobs.progress.Progress` counting tasks) as tasks finish.

    Spark's console progress bar is off (it redraws one line, unreadable in job logs): the job runs
    in a thread under its own job group and the status tracker is polled for completed tasks.
    """
    import threading
    import uuid

    sc = spark.sparkContext
    group = f"lvd-{uuid.uuid4().hex}"
    out: dict = {}

    def run() -> None:
        try:
            sc.setJobGroup(group, progress.name)  # per thread (PySpark pins Python threads to JVM threads)
            out["rows"] = rdd.collect()
        except BaseException as err:  # handed to the calling thread
            out["error"] = err

    thread = threading.Thread(target=run, name=group, daemon=True)
    thread.start()
    tracker, counted = sc.statusTracker(), 0
    try:
        while thread.is_alive():
            thread.join(1.0)
            done = 0
            for job in tracker.getJobIdsForGroup(group):
                info = tracker.getJobInfo(job)
                for stage in info.stageIds if info else ():
                    stage_info = tracker.getStageInfo(stage)
                    done += stage_info.numCompletedTasks if stage_info else 0
            if done > counted:
                progress.update(done - counted)
                counted = done
    finally:
        if thread.is_alive():  # interrupted: stop the job rather than leave it running
            sc.cancelJobGroup(group)
    if "error" in out:
        raise out["error"]
    progress.close()
    return out["rows"]
