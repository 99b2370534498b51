"""Starting (or joining) the engines a job runs on: Ray for ingest/embed, Spark for shards."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
from pathlib import Path

from lvd.schemas.job_spec import JobSpec

log = logging.getLogger("lvd")

LOOPBACK = "127.0.0.1"
SPARK_LOG4J = Path(__file__).with_name("spark-log4j2.properties")
# Seconds to wait for a named Ray address to accept a connection before giving up on it.
CONNECT_TIMEOUT_S = 10.0
# Attempts per Spark task in local mode (Spark's own default there is 1: no retry); 4 as on a cluster.
LOCAL_TASK_ATTEMPTS = 4
# How long a local Ray instance keeps an idle task worker, with the modules it imported (see `ensure_ray`).
IDLE_WORKER_KEEP_MS = 60_000
# JVM options of a local Spark session (see `_get_spark`).
LOCAL_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"


class RayUnreachableError(ConnectionError):
    """A Ray address given to the job (spec `ray.address` or RAY_ADDRESS) does not accept connections."""


def local_env_defaults() -> None:
    """Settings every run needs before Ray or Spark is imported (see README: loopback binding)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Spark workers and Ray job entrypoints must run this interpreter, not whatever `python` is first on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    bindir = os.path.dirname(sys.executable)
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def ray_token_available() -> bool:
    """Whether Ray finds a token here: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
    ~/.ray/auth_token (Ray's order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def wants_token_auth() -> bool:
    """A client of an existing cluster uses token auth: the user has a token and chose no mode."""
    return "RAY_AUTH_MODE" not in os.environ and ray_token_available()


def cluster_auth_env() -> None:
    """Before talking to an existing cluster (Jobs API client, `ray.init(address=...)`): token auth on
    when the user has a token and has not chosen a mode (RAY_AUTH_MODE), so requests carry it.

    Ray itself turns token mode on only for a cluster it finds on its own, never for a named address,
    so a token cluster would refuse lvd's requests. A cluster without auth ignores the token.
    """
    if not wants_token_auth():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:  # Ray read the mode when imported: make it read it again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def local_ray_env() -> None:
    """Before starting a local Ray instance of our own: token auth off unless the user turned it on.

    The instance listens on loopback only; with auth on Ray would write a token to ~/.ray on first use.
    """
    local_env_defaults()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayUnreachableError naming `address` unless its host:port accepts a TCP connection
    within `timeout` seconds (`ray.init` would otherwise retry a dead address for minutes)."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if m is None:  # "auto" and other forms Ray resolves itself
        return
    try:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise RayUnreachableError(f"cannot reach the Ray cluster at {address}: {reason}") from None


def ensure_ray(spec: JobSpec) -> None:
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER and RAY_AUTH_MODE when it is imported: set them first.
    if address:
        local_env_defaults()
        cluster_auth_env()
    else:
        local_ray_env()
    import ray

    if ray.is_initialized():
        return
    if address:
        # Inside a submitted Ray job RAY_ADDRESS points at the cluster this job runs on.
        check_ray_address(address)
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
            # Ray ends a task worker idle for a second once the node has more workers than CPUs,
            # and the long-lived actors (model, kNN shards, Ray Data's own) count: every stage then
            # started new workers that imported torch, FAISS and Arrow again. Idle workers are kept
            # between stages instead.
            _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
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
# Held while the session starts: the warm-up thread (`start_spark_in_background`) and a stage may ask
# for it at the same time.
_spark_lock = threading.RLock()


def get_spark(spec: JobSpec):
    """One SparkSession per process, configured from spec.spark."""
    with _spark_lock:
        return _get_spark(spec)


def _get_spark(spec: JobSpec):
    global _spark
    if _spark is not None:
        return _spark
    local_env_defaults()
    if spec.spark.master.startswith("local"):
        # Not for a cluster master: executors on other hosts must reach the driver at a routable address.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    conf = {
        "spark.app.name": f"lvd-{spec.name}",
        "spark.master": local_master_with_retries(spec.spark.master),
        "spark.driver.memory": spec.spark.driver_memory,
        "spark.executor.memory": spec.spark.executor_memory,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.python.worker.reuse": "true",
        # Replaces Spark's default log4j profile and its start-up banner (spec.spark.conf may override).
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{SPARK_LOG4J}",
    }
    if spec.spark.master.startswith("local"):
        # One machine: a few shuffle partitions (a cluster keeps Spark's default; adaptive query
        # execution merges small ones).
        conf |= {
            "spark.sql.shuffle.partitions": "8",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.driver.host": "127.0.0.1",
        }
        # The JVM's quick compiler only: on one machine the JVM shares the cores with Ray and the
        # Python shard writers, and most of its CPU went into the optimising compiler at start-up
        # (while the Ray stages run beside the warm-up); a cluster keeps the JVM's default.
        conf["spark.driver.extraJavaOptions"] += f" {LOCAL_JVM_OPTIONS}"
    conf |= spec.spark.conf
    _launch_spark_jvm(conf)
    builder = SparkSession.builder
    for k, v in conf.items():
        builder = builder.config(k, v)
    _spark = builder.getOrCreate()
    _spark.sparkContext.setLogLevel("WARN")
    return _spark


# Lines the Spark JVM writes to stderr that are no problem and that no option turns off: the JVM
# warns at start-up about the incubator module Spark's launcher always adds
# (--add-modules=jdk.incubator.vector). Shown with -v.
_JVM_NOISE = (b"WARNING: Using incubator modules",)


def _launch_spark_jvm(conf: dict[str, str]) -> None:
    """Start this process's Spark JVM (once) with its stderr read by a thread that copies it to ours
    without the `_JVM_NOISE` lines. Spark's Python workers, children of the JVM, write there too."""
    import subprocess

    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    if SparkContext._gateway is not None:
        return
    spark_conf = SparkConf().setAll(list(conf.items()))
    gateway = launch_gateway(spark_conf, popen_kwargs={"stderr": subprocess.PIPE})
    threading.Thread(
        target=_copy_jvm_stderr, args=(gateway.proc.stderr,), name="spark-jvm-stderr", daemon=True
    ).start()
    SparkContext._ensure_initialized(gateway=gateway, conf=spark_conf)


def _copy_jvm_stderr(stream) -> None:
    """Copy the JVM's stderr to this process's (file descriptor 2, where it went before) line by
    line until the JVM ends; it must keep reading whatever happens, or the JVM blocks on a full pipe."""
    for line in iter(stream.readline, b""):
        if line.startswith(_JVM_NOISE) and not log.isEnabledFor(logging.DEBUG):
            continue
        try:
            os.write(2, line)
        except OSError:
            pass


def start_spark_in_background(spec: JobSpec) -> threading.Thread:
    """Start this process's Spark session, and its Python workers, in a thread: a job whose Spark
    stages come after Ray stages finds Spark warm instead of waiting for the JVM then. A failure is
    only logged here; the stage's own `get_spark` then meets it again and reports it."""

    def warm() -> None:
        try:
            spark = get_spark(spec)
            cores = spark.sparkContext.defaultParallelism
            # One small task per core: the Python workers start (Spark reuses them) and import the
            # shard writer now rather than in the stage.
            spark.sparkContext.parallelize(range(cores), cores).map(_import_worker_modules).collect()
        except Exception as err:  # the stage that needs Spark reports it
            log.debug("spark warm-up: %s", err)

    thread = threading.Thread(target=warm, name="spark-warm-up", daemon=True)
    thread.start()
    return thread


def _import_worker_modules(_: int) -> int:
    import lvd.jobs.shard_writer  # noqa: F401

    return 0


def local_master_with_retries(master: str, attempts: int = LOCAL_TASK_ATTEMPTS) -> str:
    """`local`, `local[N]` and `local[*]` as `local[N,attempts]`: in local mode Spark runs each task
    once unless the master names a number of attempts, so one dead Python worker would fail the
    job. A master that names its attempts, or any other master, is kept as given."""
    m = re.fullmatch(r"local(?:\[(\d+|\*)\])?", master.strip())
    return f"local[{m.group(1) or 1},{attempts}]" if m else master


def stop_spark() -> None:
    global _spark
    with _spark_lock:
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
