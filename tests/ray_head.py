"""Real `ray start` clusters for tests: a head and optional worker nodes, bound to 127.0.0.1 on free
ports, each node our child process, ended by its pid.

`ray stop` would kill every Ray process on the machine, so every node runs with `--block` in its own
process group and is terminated directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Small per node: several clusters (and other tests' Ray) share the machine's memory.
OBJECT_STORE_BYTES = 300 * 1024 * 1024


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_env(auth_token: str | None = None) -> dict[str, str]:
    """Environment of Ray nodes and of `lvd` commands run against them: this venv first on PATH.

    Token auth off, or on with `auth_token` (given as RAY_AUTH_TOKEN: processes a node starts, such as
    a submitted job's driver, inherit it).
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    if auth_token:
        env["RAY_AUTH_TOKEN"] = auth_token
    env.update(
        RAY_AUTH_MODE="token" if auth_token else "disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="3",
        RAY_USAGE_STATS_ENABLED="0",
        SPARK_LOCAL_IP="127.0.0.1",
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        PATH=bindir + os.pathsep + env.get("PATH", ""),
    )
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayCluster:
    dashboard: str  # http://127.0.0.1:PORT: Jobs API and state API
    gcs: str  # 127.0.0.1:PORT: what `ray.init(address=...)` and a job spec's `ray.address` take
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)  # head first
    auth_token: str | None = None  # the cluster's token when it runs with token auth

    def request(self, path: str) -> urllib.request.Request:
        """A request to the dashboard, carrying the token when the cluster has one."""
        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
        return urllib.request.Request(f"{self.dashboard}{path}", headers=headers)

    def nodes(self) -> list[dict]:
        """The state API's node rows (node_id, node_ip, state, is_head_node, resources_total, ...)."""
        return self._state("nodes")

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def tasks(self) -> list[dict]:
        """The state API's task rows (name, type, state, node_id, ...) of every job so far."""
        return self._state("tasks")

    def actors(self) -> list[dict]:
        """The state API's actor rows (class_name, state, node_id, ...) of every job so far."""
        return self._state("actors")

    def _state(self, kind: str) -> list[dict]:
        with urllib.request.urlopen(self.request(f"/api/v0/{kind}?limit=10000&detail=true"), timeout=30) as r:
            return json.loads(r.read())["data"]["result"]["result"]

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.temp_dir.glob("node-*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in logs)


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def _node_ports() -> list[str]:
    nm, om, agent, agent_grpc, rt_env, metrics = free_ports(6)
    return [
        "--node-manager-port", str(nm), "--object-manager-port", str(om),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
    ]  # fmt: skip


# `ray start` for a node that joins a cluster. Ray's CLI refuses to join with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the switch that keeps a node on loopback), and with it on it
# rewrites `--node-ip-address 127.0.0.1` to the host's address and listens on all interfaces. Keep
# the address as given, so the node's servers bind 127.0.0.1 like the head's.
_JOIN_SHIM = (
    "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)


def python_without_lvd(dest: Path) -> Path:
    """A Python environment that has this venv's packages (Ray, torch, ...) but not lvd: a new venv
    whose .pth file puts this venv's site-packages on its path. Python reads .pth files only in
    its own site folders, so the editable install's finder (a .pth file there) is not loaded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = next(dest.glob("lib/python*/site-packages"))
    (site / "packages-of-the-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return dest / "bin" / "python"


_RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _terminate(procs: Sequence[subprocess.Popen], grace: float = 3.0) -> None:
    """End nodes: each one's whole process group (raylet, GCS, dashboard, agents and its workers).

    SIGTERM first; what is left after `grace` seconds (Ray's graceful shutdown can take tens of
    seconds on a loaded machine) is killed, so a test does not wait on it.
    """
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def ray_cluster(
    head_cpus: int = 2,
    worker_cpus: Sequence[int] = (),
    timeout: float = 120.0,
    auth_token: str | None = None,
    python: Path | None = None,
) -> Iterator[RayCluster]:
    """A head (with dashboard) and one worker node per entry of `worker_cpus`, all on 127.0.0.1;
    with `auth_token`, every node runs with Ray token auth and that token. With `python`, the nodes
    run Ray with that interpreter, whose folder comes first on their PATH (a job's `python`).

    Yields once every node is ALIVE in the state API.
    """
    gcs, dash, client = free_ports(3)
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix socket paths are length-limited
    cluster = RayCluster(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", temp_dir, auth_token=auth_token)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    common += ["--object-store-memory", str(OBJECT_STORE_BYTES)]
    # Workers bind ports the OS picks: nodes on one host would otherwise share one fixed range.
    common += ["--min-worker-port", "0", "--max-worker-port", "0"]
    ray_cmd = [_ray_bin()] if python is None else [str(python), "-c", _RAY_CLI]
    head = [
        *ray_cmd, "start", "--head", *common, "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(client), *_node_ports(),
        "--num-cpus", str(head_cpus), "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    try:
        # RAY_ADDRESS: processes the nodes start that look a cluster up (e.g. Ray Train's placement
        # group cleaner) find this one, not any other Ray instance running on the machine.
        env = {**head_env(auth_token), "RAY_ADDRESS": cluster.gcs}
        if python is not None:
            env.update(PATH=f"{python.parent}{os.pathsep}{env['PATH']}", PYSPARK_PYTHON=str(python))
            env.update(PYSPARK_DRIVER_PYTHON=str(python))
        cluster.procs.append(_spawn(head, temp_dir / "node-0-head.log", env))
        deadline = time.monotonic() + timeout
        _wait(cluster, deadline, lambda: _accepts(cluster.gcs))  # nodes may join before the dashboard is up
        for i, cpus in enumerate(worker_cpus, start=1):
            worker = [
                str(python or sys.executable),
                "-c",
                _JOIN_SHIM,
                "start",
                "--address",
                cluster.gcs,
                *common,
            ]
            worker += [*_node_ports(), "--num-cpus", str(cpus), "--temp-dir", str(temp_dir)]
            # The nodes share the head's log folder: one log monitor (the head's) forwards it once.
            worker += ["--include-log-monitor", "false"]
            worker_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
            cluster.procs.append(_spawn(worker, temp_dir / f"node-{i}-worker.log", worker_env))
        want = 1 + len(worker_cpus)
        _wait(cluster, deadline, lambda: _get(cluster.request("/api/version")))
        _wait(cluster, deadline, lambda: len(cluster.alive_nodes()) >= want)
        yield cluster
    finally:
        _terminate(cluster.procs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2):
        return True


def _get(request: urllib.request.Request) -> bool:
    with urllib.request.urlopen(request, timeout=2) as r:
        return r.status == 200


def _wait(cluster: RayCluster, deadline: float, ready) -> None:
    while True:
        dead = [p for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a ray node exited with {dead[0].returncode}:\n{cluster.log_tail()}")
        try:
            if ready():
                return
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"ray cluster did not come up:\n{cluster.log_tail()}")
        time.sleep(0.5)


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, timeout: float = 120.0, auth_token: str | None = None) -> Iterator[str]:
    """Yields the dashboard (Jobs API) address of a fresh single-node cluster."""
    with ray_cluster(head_cpus=num_cpus, timeout=timeout, auth_token=auth_token) as cluster:
        yield cluster.dashboard
