"""Progress a person can see: stage work logs rows done, rate and time left; `--quiet` silences it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lvd.jobs import cli, progress, runner
from lvd.jobs.progress import Progress
from lvd.jobs.workers import run_tasks

PROGRESS_LINE = re.compile(r"^fake step: [\d,]+/12 parts \(\d+%\), [\d,.]+ parts/s")


def _make_slow_square():
    # A nested function: Ray pickles it by value, as workers cannot import this test module.
    def slow_square(item: int) -> int:
        time.sleep(0.05)
        return item * item

    return slow_square


_slow_square = _make_slow_square()


@pytest.fixture
def every_update(monkeypatch):
    """A progress line at every update, and progress and the lvd and root log levels restored after."""
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    for name in ("RAY_DATA_LOG_LEVEL", "RAY_LOGGER_LEVEL"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    levels = {name: logging.getLogger(name).level for name in ("", "lvd", *cli._ENGINE_LOGGERS)}
    yield
    progress.set_enabled(True)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _progress_lines(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "lvd" and r.getMessage().startswith("fake step")
    ]


def test_progress_line_has_rows_rate_and_eta():
    p = Progress("embed", total=1000, unit="images", every=3600)
    p.t0 -= 10.0  # 10 s ago
    p.done = 250
    line = p.line()
    assert line.startswith("embed: 250/1,000 images (25%), 25.0 images/s, ETA 30s")
    assert "\r" not in line  # a plain line, the same in a terminal and in `lvd logs`


def test_progress_waits_for_its_interval(caplog, every_update):
    caplog.set_level(logging.INFO, logger="lvd")
    p = Progress("fake step", total=12, unit="parts", every=3600)
    p.update(5)
    assert _progress_lines(caplog) == []  # not yet: the interval has not passed
    p.close()  # the last line comes whatever the interval, with the time taken and no ETA
    (line,) = _progress_lines(caplog)
    assert PROGRESS_LINE.match(line) and line.startswith("fake step: 5/12 parts (42%)")
    assert line.endswith(" in 0s") and "ETA" not in line


def test_run_tasks_logs_progress_lines(ray_local, caplog, every_update):
    caplog.set_level(logging.INFO, logger="lvd")
    results = run_tasks(_slow_square, list(range(12)), name="fake step")
    assert results == [i * i for i in range(12)]
    lines = _progress_lines(caplog)
    assert lines and all(PROGRESS_LINE.match(line) for line in lines), lines
    assert lines[-1].startswith("fake step: 12/12 parts (100%)") and " in " in lines[-1]
    assert any("ETA" in line for line in lines[:-1])


def test_set_enabled_false_silences_run_tasks(ray_local, caplog, every_update):
    caplog.set_level(logging.INFO, logger="lvd")
    progress.set_enabled(False)
    assert run_tasks(_slow_square, list(range(12)), name="fake step") == [i * i for i in range(12)]
    assert _progress_lines(caplog) == []


def _job_file(tmp_path: Path) -> Path:
    job = tmp_path / "job.yaml"
    spec = {"name": "t", "output_dir": str(tmp_path / "out"), "pool": [{"uri": str(tmp_path)}]}
    random = {"retrieval": {"weights": "random"}}
    job.write_text(yaml.safe_dump({**spec, "sampling": {"target_size": 1}, "embedding": random}))
    return job


@pytest.mark.parametrize("quiet", [False, True])
def test_lvd_run_quiet_flag(ray_local, tmp_path, monkeypatch, caplog, every_update, quiet):
    """`lvd run` shows a stage's progress lines by default, and `--quiet` drops them and info logs."""
    seen = {}

    def fake_run_and_report(spec, force=(), until=None):
        logging.getLogger("lvd").info("stage fake: running")
        seen["results"] = run_tasks(_slow_square, list(range(12)), name="fake step")

    monkeypatch.setattr(runner, "run_and_report", fake_run_and_report)
    caplog.set_level(logging.DEBUG)  # capture everything; the command's own levels decide what is logged
    args = ["run", str(_job_file(tmp_path))] + (["--quiet"] if quiet else [])
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert seen["results"] == [i * i for i in range(12)]
    lines = _progress_lines(caplog)
    infos = [r for r in caplog.records if r.name == "lvd" and r.levelno == logging.INFO]
    if quiet:
        assert lines == [] and infos == []
        assert not progress.is_enabled()
        # Ray Data's info lines stay off even after it configures its loggers again (as each run does).
        from ray.data._internal.logging import configure_logging

        configure_logging()
        assert not logging.getLogger("ray.data").isEnabledFor(logging.INFO)
        assert not logging.getLogger("ray").isEnabledFor(logging.INFO)
    else:
        assert lines and PROGRESS_LINE.match(lines[0])
        assert any(r.getMessage() == "stage fake: running" for r in infos)


def test_quiet_reaches_the_level_ray_init_sets():
    """ray.init sets the "ray" logger's level again, from a default read when Ray is imported: a quiet
    run must have chosen it by then (a fresh process, as `lvd run` is)."""
    code = (
        "import inspect, logging\n"
        "from lvd.jobs.cli import _setup_logging\n"
        "_setup_logging(False, quiet=True)\n"
        "import ray\n"
        "print(inspect.signature(ray.init).parameters['logging_level'].default)\n"
        "print(logging.getLogger('ray').getEffectiveLevel())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_LOGGER_LEVEL", "RAY_DATA_LOG_LEVEL")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["warning", str(logging.WARNING)]
