"""A real `ray start --head` for tests, bound to 127.0.0.1 on free ports, ended by its pid.

`ray stop` would kill every Ray process on the machine, so the head runs as our child with
`--block` and is terminated directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env.update(
        RAY_AUTH_MODE="disabled",
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


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, timeout: float = 90.0) -> Iterator[str]:
    """Yields the dashboard (Jobs API) address of a fresh single-node cluster."""
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: unix socket paths are length-limited
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
        "--object-manager-port", str(om), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_env),
        "--metrics-export-port", str(metrics), "--num-cpus", str(num_cpus),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("ray head did not come up")
            time.sleep(0.5)
        yield address
    finally:
        # The whole process group: raylet, GCS, dashboard and workers started by this head.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
