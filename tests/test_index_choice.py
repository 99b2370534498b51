"""The default FAISS index per device: sized for the pool, and one FAISS can run on that device."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from lvd.curation.knn import auto_index, build_index, resolve_index, runs_on_gpu

# Index classes FAISS implements on GPUs (faiss/gpu: GpuIndexFlat, GpuIndexIVFFlat, GpuIndexIVFPQ,
# GpuIndexIVFScalarQuantizer); anything else stays on the CPU.
GPU_CLASSES = {"IndexFlat", "IndexFlatIP", "IndexIVFFlat", "IndexIVFPQ", "IndexIVFScalarQuantizer"}


def built_class(factory: str, dim: int) -> str:
    return type(faiss.downcast_index(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))).__name__


def nlist(factory: str, dim: int) -> int:
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    return faiss.extract_index_ivf(index).nlist


@pytest.mark.parametrize("n", [100_000, 1_000_000, 100_000_000, 1_000_000_000])
@pytest.mark.parametrize("dim", [384, 768, 512])
def test_gpu_choice_is_an_index_faiss_runs_on_gpu(n: int, dim: int) -> None:
    factory = auto_index(n, dim, gpu=True)
    assert runs_on_gpu(factory)
    assert built_class(factory, dim) in GPU_CLASSES, factory


@pytest.mark.parametrize("dim", [384, 768, 512, 96])
def test_cpu_choice_builds_and_refines(dim: int) -> None:
    factory = auto_index(1_000_000, dim, gpu=False)
    assert built_class(factory, dim) == "IndexRefineFlat"  # exact re-ranking of the PQ candidates
    assert not runs_on_gpu(factory)  # the reason a GPU node needs another default


def test_lists_stay_short_as_the_pool_grows() -> None:
    # A probe scans lists of at most ~1000 vectors from 1M to 100M vectors, until the lists hit the
    # cap that bounds training (higher on GPUs, which train faster).
    for gpu, cap in ((False, 65_536), (True, 262_144)):
        for n in (1_000_000, 10_000_000, 100_000_000, 1_000_000_000):
            lists = nlist(auto_index(n, 384, gpu), 384)
            assert n / lists <= 1000 or lists == cap, (gpu, n, lists)
        assert nlist(auto_index(10**9, 384, gpu), 384) == cap
    # The set-up benchmarked at 1M x 384 on this CPU is what auto picks there.
    assert auto_index(1_000_000, 384, gpu=False) == "IVF2048,PQ64x4fs,RFlat"
    assert "HNSW" in auto_index(100_000_000, 384, gpu=False)  # too many lists to scan flat


def test_given_index_is_kept_and_flagged_on_gpu(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_index("IVF1024,Flat", 10**6, 384, gpu=True) == "IVF1024,Flat"
    assert not caplog.records
    assert resolve_index("IVF1024,PQ64x4fs,RFlat", 10**6, 384, gpu=True) == "IVF1024,PQ64x4fs,RFlat"
    assert "no GPU version" in caplog.text


def test_build_index_auto_on_cpu_searches() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, info = build_index(x, factory="auto", exact_below=0, train_size=10_000)
    assert info.description == auto_index(20_000, 64, gpu=False)
    sims, ids = index.search(x[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
