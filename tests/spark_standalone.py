"""A Spark standalone cluster for tests: a master and workers started with the installed pyspark's own
`sbin/spark-daemon.sh` on 127.0.0.1 and free ports, stopped with it (by the pid files it wrote).

pyspark's wheel ships `sbin/spark-daemon.sh` but not `start-master.sh` / `start-worker.sh`, which
are thin wrappers over it: `spark-daemon.sh start org.apache.spark.deploy.master.Master 1 ...` is
what start-master.sh runs. Pid files, logs and the workers' work dirs live in a temp folder, and
SPARK_IDENT_STRING is unique, so nothing is shared with any other Spark on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ray_head import free_ports

MASTER = "org.apache.spark.deploy.master.Master"
WORKER = "org.apache.spark.deploy.worker.Worker"
# For the short-lived JVMs of a test: the quick (C1) JIT only and a single-threaded collector; most
# of the CPU a JVM that lives a minute spends goes to optimising compilation and GC threads.
TEST_JVM_OPTS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def spark_home() -> Path:
    """SPARK_HOME of the installed pyspark package (its jars, bin/ and sbin/)."""
    import pyspark

    return Path(pyspark.__file__).parent


@dataclass
class SparkStandalone:
    master_url: str  # spark://127.0.0.1:PORT: a job spec's spark.master
    master_ui: str  # http://127.0.0.1:PORT
    root: Path
    worker_dirs: list[Path] = field(default_factory=list)

    def master_state(self) -> dict:
        """The master's JSON status: workers (ALIVE, cores, memory), active and completed apps."""
        with urllib.request.urlopen(f"{self.master_ui}/json/", timeout=10) as r:
            return json.loads(r.read())

    def executor_logs(self, app_id: str) -> list[list[Path]]:
        """Per worker, the stderr files of the executors it ran for `app_id` (WORKDIR/APP/EXECUTOR/stderr)."""
        return [sorted((d / app_id).glob("*/stderr")) for d in self.worker_dirs]

    def job_conf(self) -> dict[str, str]:
        """Spark settings for a job on this cluster (a job spec's `spark.conf`)."""
        return {
            "spark.driver.extraJavaOptions": TEST_JVM_OPTS,
            "spark.executor.extraJavaOptions": TEST_JVM_OPTS,
            # Wait for every worker's executor before the first task, so that each gets work.
            "spark.scheduler.minRegisteredResourcesRatio": "1.0",
        }

    def log_tail(self, chars: int = 2000) -> str:
        logs = sorted((self.root / "logs").glob("*.out"))
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in logs)


def _daemon(env: dict[str, str], *args: str) -> subprocess.Popen:
    cmd = ["bash", str(spark_home() / "sbin" / "spark-daemon.sh"), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=120)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(proc.args)} failed: {out}")


def _pid(root: Path, ident: str, cls: str, instance: int) -> int | None:
    # The pid file spark-daemon.sh writes: $SPARK_PID_DIR/spark-$SPARK_IDENT_STRING-<class>-<n>.pid
    path = root / "pids" / f"spark-{ident}-{cls}-{instance}.pid"
    return int(path.read_text()) if path.exists() else None


@contextlib.contextmanager
def spark_standalone(
    workers: int = 2, cores: int = 1, memory: str = "1g", timeout: float = 120.0
) -> Iterator[SparkStandalone]:
    """A master and `workers` workers (`cores` and `memory` each); yields once all are ALIVE."""
    root = Path(tempfile.mkdtemp(prefix="spark-sa-", dir="/tmp"))
    ident = f"lvdtest-{uuid.uuid4().hex[:8]}"
    port, ui, *worker_ports = free_ports(2 + 2 * workers)
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(root / "logs"),
        "SPARK_PID_DIR": str(root / "pids"),
        "SPARK_IDENT_STRING": ident,
        "SPARK_CONF_DIR": str(root / "conf"),  # empty: no site config leaks in
        "PYSPARK_PYTHON": sys.executable,
        # The REST submission server would take the fixed port 6066.
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
        "SPARK_DAEMON_JAVA_OPTS": TEST_JVM_OPTS,
    }
    (root / "conf").mkdir()
    cluster = SparkStandalone(f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui}", root)
    started: list[tuple[str, int]] = [(MASTER, 1)] + [(WORKER, i + 1) for i in range(workers)]
    try:
        # All at once: each start waits a few seconds for its JVM, and workers retry until the master is up.
        starts = [
            _daemon(
                env, "start", MASTER, "1", "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)
            )
        ]
        for i in range(workers):
            work_dir = root / f"worker-{i + 1}"
            cluster.worker_dirs.append(work_dir)
            rpc, wui = worker_ports[2 * i : 2 * i + 2]
            starts.append(
                _daemon(
                    env, "start", WORKER, str(i + 1), "--host", "127.0.0.1", "--port", str(rpc),
                    "--webui-port", str(wui), "--cores", str(cores), "--memory", memory,
                    "--work-dir", str(work_dir), cluster.master_url,
                )
            )  # fmt: skip
        for proc in starts:
            _finish(proc)
        deadline = time.monotonic() + timeout
        while True:
            try:
                alive = [w for w in cluster.master_state()["workers"] if w["state"] == "ALIVE"]
                if len(alive) >= workers:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"spark standalone cluster did not come up:\n{cluster.log_tail()}")
            time.sleep(0.5)
        yield cluster
    finally:
        pids = [_pid(root, ident, cls, instance) for cls, instance in started]
        for cls, instance in reversed(started):
            with contextlib.suppress(subprocess.SubprocessError, RuntimeError):
                _finish(_daemon(env, "stop", cls, str(instance)))
        for pid in pids:  # the stop script sends SIGTERM; make sure each JVM is gone
            if pid is not None:
                _wait_gone(pid, 15.0)
        shutil.rmtree(root, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
