"""A local run's engines listen on loopback only (read from /proc: Linux, as CI is); clients of a
cluster send its token; a dead address fails fast; local Spark retries a failed task."""

from __future__ import annotations

import os
import time

import pytest
from procs import LOOPBACK_HEX, descendants, listening_addresses
from ray_head import free_ports

from lvd.jobs.engines import (
    CONNECT_TIMEOUT_S,
    RayUnreachableError,
    check_ray_address,
    local_master_with_retries,
    wants_token_auth,
)


def test_local_ray_listens_on_loopback_only(ray_local):
    """Every listening socket of the Ray processes this session started (GCS, raylet, object
    manager, workers) is bound to loopback, not to all interfaces."""
    addresses = listening_addresses(descendants(os.getpid()))
    assert addresses, "no listening socket found for this session's Ray processes"
    wide = sorted(set(addresses) - LOOPBACK_HEX)
    assert wide == [], f"Ray processes listening beyond loopback (hex addresses): {wide}"


def test_local_spark_masters_retry_a_failed_task():
    assert local_master_with_retries("local[*]") == "local[*,4]"
    assert local_master_with_retries("local") == "local[1,4]"
    assert local_master_with_retries("local[2]") == "local[2,4]"
    for kept in ("local[2,1]", "spark://head:7077", "local-cluster[2,1,1024]"):
        assert local_master_with_retries(kept) == kept


def test_a_named_ray_address_that_is_dead_fails_at_once_naming_it():
    (port,) = free_ports(1)
    t0 = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(RayUnreachableError, match=f"cannot reach the Ray cluster at {address}"):
            check_ray_address(address)
    assert time.monotonic() - t0 < CONNECT_TIMEOUT_S
    check_ray_address("auto")  # resolved by Ray itself


def test_cluster_clients_use_token_auth_when_a_token_is_set_up(monkeypatch, tmp_path):
    """RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token turn token auth on for requests to a
    cluster; a mode the user chose (RAY_AUTH_MODE) is kept."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wants_token_auth()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert not wants_token_auth()  # the named file does not exist
    (tmp_path / "token").write_text("t")
    assert wants_token_auth()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert wants_token_auth()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not wants_token_auth()


def test_spark_jvm_stderr_is_copied_without_its_start_up_warning(capfd):
    """What the Spark JVM (and its Python workers) write to stderr reaches ours line by line, except
    the incubator-module warning, which shows only with -v (lvd's logger at debug)."""
    import logging
    import os

    from lvd.jobs.engines import _copy_jvm_stderr

    jvm_says = b"WARNING: Using incubator modules: jdk.incubator.vector\nworker line 7\nlast, unended"
    lvd_log = logging.getLogger("lvd")
    level = lvd_log.level
    try:
        for debug in (False, True):
            lvd_log.setLevel(logging.DEBUG if debug else logging.INFO)
            read, write = os.pipe()
            os.write(write, jvm_says)
            os.close(write)
            with os.fdopen(read, "rb") as stream:
                _copy_jvm_stderr(stream)
            err = capfd.readouterr().err
            assert err == (jvm_says.decode() if debug else "worker line 7\nlast, unended")
    finally:
        lvd_log.setLevel(level)


def test_py4j_connection_lines_show_only_with_verbose():
    """py4j logs a line at INFO for every gateway connection it closes; lvd's log at INFO (the
    default) leaves them out, -v shows them."""
    import logging

    from lvd.jobs.cli import _setup_logging

    py4j = logging.getLogger("py4j.clientserver")
    levels = {name: logging.getLogger(name).level for name in ("", "lvd", "py4j", "faiss.loader")}
    try:
        for verbose in (False, True):
            logging.getLogger("py4j").setLevel(logging.NOTSET)  # as in a new process
            _setup_logging(verbose=verbose)
            assert logging.getLogger("lvd").isEnabledFor(logging.INFO)
            assert py4j.isEnabledFor(logging.INFO) == verbose
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
