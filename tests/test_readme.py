"""The README's quick start, run as written in a new folder, in order (small sizes through the two
variables the README names)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no bash block under '## Quick start'"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    commands = quick_start_commands()
    # The last command is this suite: .ci/run runs exactly it, so it is not run again from here.
    assert commands[-1] == "make test" and "make test" in (REPO / ".ci" / "run").read_text()
    # A folder of its own, seeing the clone's Makefile and its set-up .venv as a user's clone would.
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "LVD_DEMO_IMAGES": "60", "LVD_PRETRAIN_STEPS": "4"}
    outputs = []
    for command in commands[:-1]:
        proc = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-4000:])
        outputs.append(proc.stdout)
    demo = tmp_path / "lvd-demo"
    assert list((demo / "output" / "shards").glob("lvd-*.tar"))
    assert (demo / "output" / "report.html").stat().st_size > 0
    assert (demo / "pretrain" / "teacher_backbone.pth").exists()
    knn = json.loads(outputs[-1].strip().splitlines()[-1])
    assert knn["n_val"] == 8 * 6 and knn["classes"] == 8
    assert knn["baseline"]["backbone"] == "random init"
