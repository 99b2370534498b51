"""Faults injected into real runs of the demo job (a small pool), each checked against an uninterrupted run:

- `lvd run` SIGKILLed (with its Ray and Spark processes) at seeded points spread over the stages, each
  rerun killed at a later point, then run to the end: same shards, byte for byte, and the same rows,
  none missing or twice, in every table;
- a Spark task that dies while writing a tar: retried, no partial tar under a final name, same shards;
- the output on a full, then on a read-only file system: one line naming the path, and the run
  resumes from what was there once the disk has room again;
- a stale Ray cluster record (a head started, then killed by pid): a local run starts its own Ray;
- one embed actor's process SIGKILLed mid-stage: the stage ends with every image embedded once.

The uninterrupted run is made in this process, on the session's Ray and Spark (the faults are in
the `lvd` processes the tests start, not in it), and its output is moved aside.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from procs import LOOPBACK_HEX, descendants, kill_session, listening_addresses, readable_address, session
from ray_head import OBJECT_STORE_BYTES, _node_ports, free_ports, head_env

from lvd.jobs.demo import build_demo
from lvd.jobs.pipeline import STAGE_NAMES, run_job
from lvd.jobs.shard_writer import DIE_WRITING_TAR_ENV
from lvd.schemas import layout
from lvd.schemas.job_spec import load_job_spec

LVD = str(Path(sys.executable).parent / "lvd")
N_IMAGES = 60
SAMPLES_PER_SHARD = 8  # several shards, so a kill can land between two of them
KILL_POINTS = 8
KILL_SEED = 12
RUN_TIMEOUT = 600
FREE_BYTES = 24 * 1024  # room left on the full disk: the job file and a few small parts

# The tables every stage leaves, with the columns that identify a row.
TABLE_KEYS = {
    layout.IMAGES: ("image_id",),
    layout.DEDUP: ("image_id",),
    layout.CLUSTERS: ("image_id",),
    layout.CENTROIDS: ("level", "cluster_id"),
    layout.RETRIEVED: ("seed_set", "seed_id", "image_id"),
    layout.CURATED: ("image_id",),
}


@dataclass
class Demo:
    job: Path  # job.yaml; its output_dir is `output` beside it
    out: Path
    reference: Path  # the uninterrupted run's output
    stage_seconds: dict[str, float]  # each stage's time in the uninterrupted run


class Run:
    """`lvd ARGS` in its own session, its output lines read as they come with the stage each started."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [LVD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or head_env(),
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.stages: list[str] = []  # stages that started running, in order
        self.started = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.started:
                self.lines.append(line)
                for name in STAGE_NAMES:
                    if f"stage {name}: running" in line:
                        self.stages.append(name)
                        self.started.notify_all()
        with self.started:
            self.started.notify_all()

    def wait_for_stage(self, at_or_after: str, timeout: float = RUN_TIMEOUT) -> str | None:
        """The first stage at or after `at_or_after` (in stage order) that starts running; None if
        the run ends first."""
        rank = STAGE_NAMES.index(at_or_after)
        with self.started:
            self.started.wait_for(
                lambda: (
                    self.proc.poll() is not None
                    and not self.reader.is_alive()
                    or any(STAGE_NAMES.index(s) >= rank for s in self.stages)
                ),
                timeout=timeout,
            )
            return next((s for s in self.stages if STAGE_NAMES.index(s) >= rank), None)

    def finish(self, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            kill_session(self.proc)  # nothing of it outlives the test
        self.reader.join(timeout=10)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "".join(self.lines), "")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return Run(*args, env=env).finish()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local) -> Demo:
    """The demo job on a small pool, run once without faults; its output is moved to `reference`."""
    root = tmp_path_factory.mktemp("faults")
    job = build_demo(root, n_images=N_IMAGES)
    doc = yaml.safe_load(job.read_text())
    doc["shards"]["samples_per_shard"] = SAMPLES_PER_SHARD
    job.write_text(yaml.safe_dump(doc, sort_keys=False))
    reports = run_job(load_job_spec(job))
    out, reference = root / "output", root / "reference"
    seconds = {report.name: report.seconds for report in reports}
    shutil.move(out, reference)
    return Demo(job, out, reference, seconds)


def kill_points(stage_seconds: dict[str, float], n: int, seed: int) -> list[tuple[str, float]]:
    """`n` seeded (stage, seconds after the stage started) points in stage order: one in every stage,
    the rest in stages drawn by their share of the run; each within 80% of the stage's time."""
    rng = np.random.default_rng(seed)
    names = list(stage_seconds)
    weights = np.array([stage_seconds[s] for s in names]) / sum(stage_seconds.values())
    chosen = names + [str(s) for s in rng.choice(names, size=max(0, n - len(names)), p=weights)]
    points = [(s, float(rng.uniform(0, 0.8 * stage_seconds[s]))) for s in chosen]
    return sorted(points, key=lambda p: (names.index(p[0]), p[1]))


def _rows(table: pa.Table, keys: tuple[str, ...]) -> list[tuple]:
    """A table's rows as sorted tuples: floats rounded (vectors are compared apart), keys first."""

    def value(v):
        if isinstance(v, float):
            return round(v, 3)
        if isinstance(v, list):
            return tuple(value(x) for x in v)
        return v

    cols = list(keys) + [c for c in table.column_names if c not in keys and c != "centroid"]
    return sorted(tuple(value(r[c]) for c in cols) for r in table.select(cols).to_pylist())


def assert_same_output(got: Path, want: Path) -> None:
    """Shards byte-identical (and nothing else there, no temp file); every table's rows the same, each
    key once. The stage's own marker files (`_marker.json`: times) are left out."""
    got_shards, want_shards = layout.shards_dir(got), layout.shards_dir(want)
    names = sorted(p.name for p in want_shards.iterdir() if not p.name.startswith("_"))
    assert sorted(p.name for p in got_shards.iterdir() if not p.name.startswith("_")) == names
    for name in names:
        assert (got_shards / name).read_bytes() == (want_shards / name).read_bytes(), name
    assert_same_tables(got, want)


def assert_same_tables(got: Path, want: Path) -> None:
    """Every table up to `curated`: the same rows, each key once; embeddings to float tolerance."""
    for table, keys in TABLE_KEYS.items():
        g, w = layout.read_table(got, table), layout.read_table(want, table)
        g_rows, w_rows = _rows(g, keys), _rows(w, keys)
        assert len({r[: len(keys)] for r in g_rows}) == len(g_rows), f"{table}: a row twice"
        assert g_rows == w_rows, f"{table}: rows differ"
    for model in (layout.RETRIEVAL, layout.COPY_DETECTION):
        g, w = (layout.read_table(d, layout.EMBEDDINGS, model) for d in (got, want))
        g_ids, w_ids = g.column("image_id").to_numpy(), w.column("image_id").to_numpy()
        assert len(set(g_ids)) == len(g_ids), f"{model} embeddings: an image twice"
        assert sorted(g_ids) == sorted(w_ids), f"{model} embeddings: images differ"
        order_g, order_w = np.argsort(g_ids), np.argsort(w_ids)
        vecs = [np.array(t.column("vector").to_pylist(), dtype=np.float32) for t in (g, w)]
        # Batches are laid out differently after a kill: the forward pass may round differently.
        np.testing.assert_allclose(vecs[0][order_g], vecs[1][order_w], atol=2e-3)


@pytest.mark.timeout(1800)  # the uninterrupted run (module fixture), 8 killed runs and a last one
def test_killed_runs_resume_to_the_uninterrupted_result(demo):
    """8 seeded points over the stages; each kill takes the whole process tree (driver, Ray, Spark)
    at once; each rerun resumes and is killed at the next point; the last rerun finishes."""
    points = kill_points(demo.stage_seconds, KILL_POINTS, KILL_SEED)
    assert {s for s, _ in points} == set(STAGE_NAMES)
    killed_in, addresses = [], set()
    t0 = time.monotonic()
    for target, delay in points:
        run = Run("run", str(demo.job))
        started = run.wait_for_stage(target)
        if started is not None:
            time.sleep(delay if started == target else 0.0)
        if run.proc.poll() is None:
            addresses |= set(listening_addresses(session(run.proc.pid)))
            killed_in.append(run.stages[-1] if run.stages else "start-up")
            kill_session(run.proc)
        done = run.finish()
        assert done.returncode in (0, -9), done.stdout[-4000:]
        print(f"{time.monotonic() - t0:7.1f} s: point ({target}, {delay:.1f} s), killed in {killed_in[-1:]}")
    final = _run("run", str(demo.job))
    assert final.returncode == 0, final.stdout[-4000:]
    print(f"kill points {points}; killed while running {killed_in}")
    print("listening addresses of the killed runs:", sorted(readable_address(a) for a in addresses))
    assert len(killed_in) == KILL_POINTS, (points, killed_in)
    assert len(set(killed_in)) >= 5, killed_in  # spread over the stages
    assert addresses and addresses <= LOOPBACK_HEX, sorted(addresses)
    assert_same_output(demo.out, demo.reference)


def test_a_spark_task_dying_mid_tar_is_retried_and_no_partial_tar_is_visible(demo, tmp_path):
    """The shards stage again, with one tar writer killed (SIGKILL) after its first member; a watcher
    opens every final-named tar it sees while the stage runs."""
    if not (demo.out / "shards" / layout.MARKER).exists():
        assert _run("run", str(demo.job)).returncode == 0
    marker = tmp_path / "died"
    shards_dir = layout.shards_dir(demo.out)
    seen, partial, stop = set(), [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for p in list(shards_dir.glob("lvd-*.tar")):
                try:
                    with tarfile.open(p) as tar:
                        members = tar.getmembers()
                        for m in members:
                            tar.extractfile(m).read()
                    seen.add(p.name)
                    if len(members) % 2:  # image + json per sample
                        partial.append(p.name)
                except FileNotFoundError:
                    continue
                except (tarfile.TarError, OSError) as err:
                    partial.append(f"{p.name}: {err}")
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        done = _run(
            "run", str(demo.job), "--force", "shards", env={**head_env(), DIE_WRITING_TAR_ENV: str(marker)}
        )
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stdout[-4000:]
    assert marker.exists(), "no tar writer died: the hook did not run"
    assert not Path(marker.read_text()).exists()  # the dead attempt's temp file was removed
    assert partial == [] and seen, (partial, seen)
    assert_same_output(demo.out, demo.reference)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _error_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stdout.splitlines() if line.startswith("lvd: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stdout, done.stdout[-4000:]
    return errors[0]


def test_full_then_read_only_disk_fail_in_one_line_and_the_run_resumes(demo, tmp_path):
    """The output on a small tmpfs holding the first three stages' output and a few free pages: the
    run meets a full disk (one line names the path), then a read-only one (refused before any work,
    naming the path and the read-only file system). With room again the run resumes from what was there and ends with the uninterrupted run's result."""
    with tmpfs(tmp_path / "disk", "32m") as disk:
        out = disk / "output"
        out.mkdir()
        for name in ("ingest", "embed", "dedup"):
            shutil.copytree(layout.stage_dir(demo.reference, name), layout.stage_dir(out, name))
        doc = yaml.safe_load(demo.job.read_text())
        doc["output_dir"] = str(out)
        job = demo.job.with_name("job-on-tmpfs.yaml")  # beside the data: the same image paths
        job.write_text(yaml.safe_dump(doc, sort_keys=False))
        filler = disk / "filler"
        with open(filler, "wb") as f:  # fill the disk, then leave a few pages: the run fails mid-way
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            f.truncate(f.tell() - FREE_BYTES)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

        full = _run("run", str(job), "--until", "sample")
        assert full.returncode == 1
        line = _error_line(full)
        assert "No space left on device" in line and str(out) in line, line
        for p, data in before.items():  # nothing written before is damaged
            assert p.read_bytes() == data, p

        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        try:
            read_only = _run("run", str(job), "--until", "sample")
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        # Checked before any work (the output folder is not writable): a usage error, exit 2.
        assert read_only.returncode == 2, read_only.stdout[-4000:]
        assert "Read-only file system" in read_only.stdout and str(out) in read_only.stdout, read_only.stdout
        assert "Traceback" not in read_only.stdout and "stage ingest: running" not in read_only.stdout

        filler.unlink()
        resumed = _run("run", str(job), "--until", "sample")  # the shards stage is the kill test's
        assert resumed.returncode == 0, resumed.stdout[-4000:]
        assert "ingest    skipped (done)" in resumed.stdout and "dedup     skipped (done)" in resumed.stdout
        assert_same_tables(out, demo.reference)


def test_a_stale_ray_record_does_not_stop_a_local_run(demo, tmp_path):
    """A `ray start --head` on this Ray temp folder, killed by pid, leaves its address recorded (where
    `ray.init()` without an address looks); a local `lvd run` starts a Ray of its own and finishes."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: unix socket paths are length-limited
    env = {**head_env(), "RAY_TMPDIR": str(ray_tmp)}
    (gcs,) = free_ports(1)
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(gcs),
         "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--num-cpus", "1",
         "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
         "--min-worker-port", "0", "--max-worker-port", "0", *_node_ports(),
         "--temp-dir", str(ray_tmp / "ray")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        record = ray_tmp / "ray" / "ray_current_cluster"
        try:
            deadline = time.monotonic() + 120
            while not record.exists() and time.monotonic() < deadline and head.poll() is None:
                time.sleep(0.5)
            assert record.exists(), "the head wrote no cluster record"
        finally:
            kill_session(head)
        assert record.read_text().strip() == f"127.0.0.1:{gcs}"  # the record names the dead head

        doc = yaml.safe_load(demo.job.read_text())
        doc["output_dir"] = str(tmp_path / "out")
        job = demo.job.with_name("job-stale-record.yaml")
        job.write_text(yaml.safe_dump(doc, sort_keys=False))
        t0 = time.monotonic()
        done = _run("run", str(job), "--until", "ingest", env=env)
        assert done.returncode == 0, done.stdout[-4000:]
        assert time.monotonic() - t0 < 120
        want = layout.read_table(demo.reference, layout.IMAGES).num_rows
        assert layout.read_table(tmp_path / "out", layout.IMAGES).num_rows == want
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _embed_actor_pids() -> set[int]:
    """Processes of this test session's Ray that run an embed model actor (Ray names the process
    after the actor class)."""
    pids = set()
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if b"EmbedActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
    return pids


def test_an_embed_actor_killed_mid_stage_is_replaced_and_every_image_is_embedded_once(
    demo, tmp_path, ray_local
):
    """The embed stage in this process (on the session's Ray) over the demo's ingest output, with
    small batches; once the first batch's chunk is written, the actor's process is SIGKILLed. Ray
    restarts the actor and retries its batch; the stage ends with each ok image once, as embedded
    without the fault."""
    from lvd.jobs.stage import StageContext
    from lvd.jobs.stages import embed
    from lvd.schemas.job_spec import load_job_spec

    doc = yaml.safe_load(demo.job.read_text())
    doc["output_dir"] = str(tmp_path / "out")
    for model in doc["embedding"].values():
        if isinstance(model, dict):
            model["batch_size"] = 4
    doc["embedding"]["num_actors"] = 1
    job = demo.job.with_name("job-embed-kill.yaml")
    job.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_job_spec(job)
    out = Path(spec.output_dir)
    shutil.copytree(layout.stage_dir(demo.reference, "ingest"), layout.stage_dir(out, "ingest"))
    ctx = StageContext(spec=spec, out_dir=out, stage=embed.STAGE)
    before = _embed_actor_pids()
    result: dict = {}

    def run_stage() -> None:
        try:
            result["summary"] = embed.run(ctx)
        except BaseException as err:  # handed to the test's thread
            result["error"] = err

    stage = threading.Thread(target=run_stage, daemon=True)
    stage.start()
    chunks = ctx.scratch_dir(embed.CHUNKS)
    victim = None
    deadline = time.monotonic() + RUN_TIMEOUT
    while stage.is_alive() and time.monotonic() < deadline:
        actors = _embed_actor_pids() - before
        if actors and chunks.exists() and any(chunks.rglob("*.parquet")):
            victim = min(actors)
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert victim is not None, "the stage ended before an actor had written a chunk"
    killed_mid_stage = stage.is_alive() and not all(
        layout.part_path(ctx.stage_dir, layout.part_index(p), layout.RETRIEVAL).exists()
        for p in ctx.parts(layout.IMAGES)
    )
    stage.join(RUN_TIMEOUT)
    assert "error" not in result, result.get("error")
    assert killed_mid_stage
    assert _embed_actor_pids() - before - {victim}, "no actor replaced the killed one"

    images = layout.read_table(demo.reference, layout.IMAGES)
    ok = sorted(images.filter(pc.equal(images.column("status"), "ok")).column("image_id").to_pylist())
    assert result["summary"].images == len(ok)
    for model in (layout.RETRIEVAL, layout.COPY_DETECTION):
        got = layout.read_table(out, layout.EMBEDDINGS, model)
        ids = got.column("image_id").to_pylist()
        assert sorted(ids) == ok, f"{model}: images missing or twice"
        want = layout.read_table(demo.reference, layout.EMBEDDINGS, model)
        order = {i: k for k, i in enumerate(want.column("image_id").to_pylist())}
        vecs = np.array(got.column("vector").to_pylist(), dtype=np.float32)
        ref = np.array(want.column("vector").to_pylist(), dtype=np.float32)[[order[i] for i in ids]]
        np.testing.assert_allclose(vecs, ref, atol=2e-3)
