"""Pretraining on small shards: resume equals an uninterrupted run, NaN guard, teacher export, CLI."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
import yaml
from typer.testing import CliRunner

from lvd.embeddings.models import load_embedding_model
from lvd.embeddings.preprocess import PreprocessConfig, normalize, prepare_image
from lvd.embeddings.vit import ARCHS
from lvd.jobs.cli import app
from lvd.schemas.job_spec import ModelSpec
from lvd.training.config import load_config
from lvd.training.knn_eval import load_eval_backbone
from lvd.training.meta_arch import SSLMetaArch
from lvd.training.train import CHECKPOINT_NAME, METRICS_NAME, NonFiniteLossError, pretrain

# The tiny config (4-block ViT-Tiny, 64/32 px crops), batch 4: a step takes a fraction of a second on CPU.
OVERRIDES = {
    "train": {
        "batch_size_per_gpu": 4,
        "epoch_length": 3,
        "num_workers": 0,
        "augment_threads": 1,
        "shuffle_buffer": 16,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    "optim": {"epochs": 2, "warmup_epochs": 1},
    "teacher": {"warmup_teacher_temp_epochs": 1},
    "crops": {"local_crops_number": 2},
    "compute": {"threads": 1},  # the suite shares 2 cores; 2 OpenMP threads would spin against each other
}


def _image(rng: np.random.Generator) -> bytes:
    arr = np.zeros((48, 64, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    y, x = rng.integers(0, 24), rng.integers(0, 40)
    arr[y : y + 24, x : x + 24] = rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A curation-output-like folder: shards/lvd-00000{0,1,2}.tar + index.json (one bad sample)."""
    root = tmp_path_factory.mktemp("job")
    shard_dir = root / "shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    rows, key = [], 0
    for s in range(3):
        name = f"lvd-{s:06d}.tar"
        with wds.TarWriter(str(shard_dir / name)) as w:
            for _ in range(10):
                data = b"not a jpeg" if key == 7 else _image(rng)
                w.write({"__key__": f"{key:08d}", "jpg": data, "json": b"{}"})
                key += 1
        rows.append({"shard": name, "samples": 10})
    (shard_dir / "index.json").write_text(json.dumps({"shards": rows, "total": 30}))
    return root


@pytest.fixture(scope="module")
def full_run(job_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return pretrain(load_config("tiny", OVERRIDES), str(job_dir / "shards"), out, resume=False), out


def test_run_logs_and_checkpoints(full_run):
    result, out = full_run
    assert (result.start_step, result.end_step) == (0, 6) and len(result.losses) == 6
    assert all(np.isfinite(r["total"]) for r in result.losses)
    # Training lowers the DINO term from the first steps to the last. (The total is not checked:
    # over 6 steps of batch 4 it moves with the iBOT term, which depends on which crops were masked,
    # e.g. 2.65 -> 3.47 -> 2.66 on consecutive steps; it only used to fall because KoLeo started at
    # 18 when LayerScale 1e-5 made every CLS token alike, see configs/tiny.yaml.)
    first, last = result.losses[:2], result.losses[-2:]
    assert np.mean([r["dino"] for r in last]) < np.mean([r["dino"] for r in first]) - 0.05
    rows = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 6 and {"student", "teacher", "optimizer", "data", "dino_loss"} <= set(ckpt)
    assert ckpt["data"][0]["epoch"] == 2 and result.bad_samples == 1  # 6 batches of 4 read past the bad one
    # The teacher is an EMA of the student: close to it but not equal after updates.
    s, t = (
        ckpt["student"]["backbone.blocks.0.attn.qkv.weight"],
        ckpt["teacher"]["backbone.blocks.0.attn.qkv.weight"],
    )
    assert not torch.equal(s, t) and (s - t).abs().max() < 0.1


def test_stopped_and_resumed_run_matches_uninterrupted(full_run, job_dir, tmp_path):
    result, out = full_run
    cfg_path = tmp_path / "cfg.yaml"
    cfg = load_config("tiny", OVERRIDES)
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = tmp_path / "resumed"
    # First half through the CLI with --from-job, then resume in-process.
    cli = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--from-job",
            str(job_dir),
            "--config",
            str(cfg_path),
            "--output",
            str(run_dir),
            "--stop-after",
            "3",
        ],
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output.strip().splitlines()[-1])["steps"] == [0, 3]
    second = pretrain(cfg, str(job_dir / "shards"), run_dir, resume=True)
    assert second.start_step == 3 and second.end_step == 6
    rows = [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    for got, want in zip(rows, result.losses, strict=True):
        for k in ("total", "dino", "ibot", "koleo"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (got["step"], k)
    a = torch.load(out / CHECKPOINT_NAME, weights_only=False)["teacher"]
    b = torch.load(run_dir / CHECKPOINT_NAME, weights_only=False)["teacher"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(job_dir, tmp_path, monkeypatch):
    original = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # step 3
            losses["dino"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(SSLMetaArch, "forward_backward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*checkpoint\.pth \(step 2\)"):
        pretrain(load_config("tiny", OVERRIDES), str(job_dir / "shards"), tmp_path, resume=False)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 2
    assert not (tmp_path / "teacher_backbone.pth").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_exported_teacher_embeds_in_embed_stage(full_run):
    result, out = full_run
    cfg = load_config("tiny", OVERRIDES)
    size, patch = cfg.crops.global_crops_size, cfg.model.patch_size
    spec = ModelSpec(
        arch=cfg.model.arch,
        weights=str(result.teacher_export),
        format="lvd",
        patch_size=patch,
        image_size=size,
        resize_size=size + 8,
        dtype="float32",
        precision="float32",  # compared with the fp32 reference below
    )
    model = load_embedding_model(spec, "cpu")
    assert model.dim == 192
    rng = np.random.default_rng(5)
    crops = np.stack([prepare_image(_image(rng), PreprocessConfig(size + 8, size, patch)) for _ in range(3)])
    vectors = model.embed_uint8(crops)
    # Reference: the teacher backbone from the training checkpoint, run directly.
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    backbone = SSLMetaArch.build_network(cfg, 0.0).backbone
    backbone.load_state_dict({k[9:]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")})
    with torch.no_grad():
        ref = torch.nn.functional.normalize(backbone.eval()(normalize(crops)), dim=-1).numpy()
    np.testing.assert_allclose(vectors, ref, rtol=1e-4, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # `lvd eval knn` takes either file: the checkpoint's teacher equals the export.
    from_ckpt = load_eval_backbone(out / CHECKPOINT_NAME).state_dict()
    from_export = load_eval_backbone(result.teacher_export).state_dict()
    assert from_ckpt.keys() == from_export.keys()
    assert all(torch.equal(from_ckpt[k], from_export[k]) for k in from_ckpt)


@pytest.mark.parametrize("name", ["tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"])
def test_builtin_configs_validate(name):
    cfg = load_config(name)
    assert cfg.model.arch == ("vit_tiny_d4" if name == "tiny" else name)
    assert cfg.optim.clip_grad == 3.0 and cfg.dino.koleo_loss_weight == 0.1
    assert cfg.total_steps == round(cfg.optim.epochs * cfg.train.epoch_length)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in configs: .*tiny"):
        load_config("nope")
    with pytest.raises(ValueError, match="batch_sise"):
        load_config("tiny", {"train": {"batch_sise": 3}})


@pytest.mark.parametrize("steps", [1, 3, 40, 1000])
def test_total_steps_keeps_schedule_shape(steps):
    cfg = load_config("tiny")
    scaled = cfg.with_total_steps(steps)
    assert scaled.total_steps == steps
    warmup = scaled.optim.warmup_epochs * scaled.train.epoch_length
    if steps >= cfg.optim.epochs:  # at least one step per epoch: warmup is the same fraction of the run
        assert warmup / steps == pytest.approx(cfg.optim.warmup_epochs / cfg.optim.epochs, rel=0.25)
    assert cfg.total_steps == 300  # the original is untouched


def _reference_sinkhorn(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp in float64, written out here (not training.loss): rows sum to 1."""
    q = torch.exp((logits.double() - logits.double().max()) / temperature)
    q = q / q.sum()
    b, k = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True) / k
        q = q / q.sum(dim=1, keepdim=True) / b
    return q * b


def test_tiny_config_teacher_targets_are_not_uniform_at_init():
    """With LayerScale 1e-5 every image's CLS token was the same at init (cosine 0.999999), so the
    Sinkhorn-Knopp targets were exactly uniform and the DINO loss sat at log(K) for whole CPU runs."""
    cfg = load_config("tiny")
    torch.manual_seed(cfg.train.seed)
    model = SSLMetaArch(cfg)
    size = cfg.crops.global_crops_size
    images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls = model.teacher.backbone(images)
        logits = model.teacher.dino_head(cls)
    cls = torch.nn.functional.normalize(cls, dim=-1)
    off_diagonal = (cls @ cls.t())[~torch.eye(len(cls), dtype=torch.bool)]
    assert off_diagonal.mean() < 0.95
    q = _reference_sinkhorn(logits, cfg.teacher.warmup_teacher_temp)
    entropy = -(q * q.clamp_min(1e-300).log()).sum(-1).mean().item()
    assert entropy < np.log(cfg.dino.head_n_prototypes) - 0.05  # it was log(K) - 1e-7


_DIST_SCRIPT = """
import json, os, sys
from lvd.training.config import load_config
from lvd.training.train import pretrain
cfg = load_config("tiny", json.loads(sys.argv[1]))
r = pretrain(cfg, sys.argv[2], sys.argv[3], resume=False)
print("LOSSES", os.environ["RANK"], json.dumps([x["total"] for x in r.losses]), flush=True)
"""


def test_two_process_fsdp_run_matches_one_process_run_of_the_same_global_batch(job_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo), FSDP2, against one process laid out for 2 data ranks (the
    same global batch of 8: the same images, crops, masks and KoLeo groups): the losses of the first
    steps agree to float tolerance; the checkpoint holds both ranks' data positions."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT)
    overrides = {
        **OVERRIDES,
        "optim": {"epochs": 2 / 3, "warmup_epochs": 1},
        "compute": {"threads": 1, "distributed": "fsdp"},
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*torchrun, str(script), json.dumps(overrides), str(job_dir / "shards"), str(tmp_path / "run")]
    # Own process group, so a hang is cleaned up whole (torchrun's workers included).
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    out = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = {
        line.split()[1]: json.loads(line.split(maxsplit=2)[2])
        for line in out.stdout.splitlines()
        if line.startswith("LOSSES")
    }
    assert set(losses) == {"0", "1"} and len(losses["0"]) == 2
    one = pretrain(
        load_config("tiny", {**overrides, "train": {**OVERRIDES["train"], "data_ranks": 2}}),
        str(job_dir / "shards"),
        tmp_path / "one-process",
        resume=False,
    )
    assert len(one.losses) == 2
    # Only float32 summation order differs (one batch of 8 against two halves of 4 whose gradients
    # are reduced); a batch laid out otherwise (e.g. without data_ranks, or the ranks reading the same
    # images) moves the losses at the second or third significant digit.
    for rank in ("0", "1"):
        for step, (got, want) in enumerate(zip(losses[rank], one.losses, strict=True)):
            assert got == pytest.approx(want["total"], rel=1e-5, abs=1e-6), (rank, step, got, want)
    metrics = [json.loads(line) for line in (tmp_path / "run" / METRICS_NAME).read_text().splitlines()]
    for row, want in zip(metrics, one.losses, strict=True):
        for key in ("dino", "ibot", "koleo"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (row, want)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["world_size"] == 2 and [d["config"]["rank"] for d in ckpt["data"]] == [0, 1]
    # The export is whole (every block gathered from the shards), not one rank's part.
    depth = ARCHS[load_config("tiny").model.arch].depth
    assert load_eval_backbone(tmp_path / "run" / "teacher_backbone.pth").n_blocks == depth
