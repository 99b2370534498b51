"""Fixtures shared by the test modules: small generated images and one local Ray per session."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_PIL_FORMAT = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
}


def make_image_bytes(
    fmt: str = "png", size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0
) -> bytes:
    """Encoded random-noise image (width, height = size); a different seed gives different bytes."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, _PIL_FORMAT[fmt.lower()])
    return buf.getvalue()


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """Factory: image_bytes(fmt="png", size=(32, 32), mode="RGB", seed=0) -> encoded bytes."""
    return make_image_bytes


@pytest.fixture
def tiny_images() -> Callable[..., list[Path]]:
    """Factory: tiny_images(folder, n, fmt="png", size=(32, 32), seed=0) -> n distinct image files,
    named 0000.<fmt>, 0001.<fmt>, ... (seeds seed, seed+1, ...)."""

    def make(
        folder: Path, n: int, fmt: str = "png", size: tuple[int, int] = (32, 32), seed: int = 0
    ) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(n):
            path = folder / f"{i:04d}.{fmt}"
            path.write_bytes(make_image_bytes(fmt, size, seed=seed + i))
            paths.append(path)
        return paths

    return make


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance with 2 CPUs for the whole session (through jobs.engines.ensure_ray),
    shut down at the end. Stages call ensure_ray too; it reuses this instance."""
    from lvd.jobs.engines import ensure_ray, shutdown_ray
    from lvd.schemas.job_spec import parse_job_spec

    spec = parse_job_spec(
        {
            "name": "tests",
            "output_dir": "unused",
            "pool": [{"uri": "unused"}],
            "sampling": {"target_size": 1},
            "embedding": {"retrieval": {"weights": "random"}},
            "ray": {"num_cpus": 2},
        }
    )
    ensure_ray(spec)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def demo_job(tmp_path_factory, ray_local):
    """The demo job (240 images) run once per session: (spec, data root, stage reports, seconds).
    Shared by every test that reads a whole job's output (each demo run costs about a minute)."""
    import time

    from lvd.jobs.demo import build_demo
    from lvd.jobs.pipeline import run_job
    from lvd.schemas.job_spec import load_job_spec

    root = tmp_path_factory.mktemp("demo")
    spec = load_job_spec(build_demo(root, n_images=240))
    t0 = time.perf_counter()
    reports = run_job(spec)
    return spec, root, reports, time.perf_counter() - t0


@pytest.fixture(scope="session")
def moved_demo_job(demo_job, tmp_path_factory):
    """The demo's folder (data and output) copied elsewhere, as if moved, and run again up to
    sampling there: ((old root, old output), (new root, new output), stage reports)."""
    import shutil

    from lvd.jobs.pipeline import run_job
    from lvd.schemas.job_spec import load_job_spec

    spec, root, _, _ = demo_job
    moved = tmp_path_factory.mktemp("moved") / "elsewhere" / "demo"
    shutil.copytree(root, moved, symlinks=True)
    moved_spec = load_job_spec(moved / "job.yaml")
    reports = run_job(moved_spec, until="sample")
    return (root, Path(spec.output_dir)), (moved, Path(moved_spec.output_dir)), reports
