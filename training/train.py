"""The pretraining loop: shards -> multi-crop + masks -> student/teacher step -> checkpoints, resumable.

Reproducibility: the augmentation of sample i of step s on data rank r is seeded by (seed, r, s, i),
the masks by (seed, r, s), torch's RNG (drop path) is reseeded every step, and the data position is
part of the checkpoint, so a run stopped and resumed computes the same steps as one that never stopped.

Data ranks (`train.data_ranks`, default one per process) are the slices the global batch is laid out
in: each reads its own shard streams, crops, masks and KoLeo group. A process may train several, so a
one-process run with `data_ranks: 2` computes the steps of a two-process run (see test_multinode).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from lvd.embeddings.checkpoints import is_torch_save_file
from lvd.embeddings.cpu_threads import omp_wait_policy
from lvd.training.augment import MultiCrop, MultiCropConfig, augment_batch
from lvd.training.config import PretrainConfig
from lvd.training.launch import (
    DistEnv,
    autocast_context,
    gather_objects,
    load_model_state_dict,
    load_optimizer_state_dict,
    mean_across_ranks,
    model_state_dict,
    optimizer_state_dict,
    resolve_strategy,
    setup_distributed,
    wrap_networks,
)
from lvd.training.masking import BlockMaskGenerator, sample_masks
from lvd.training.meta_arch import SSLMetaArch
from lvd.training.optim import apply_schedules, build_optimizer, fuse_groups, param_groups
from lvd.training.schedules import Schedules, build_schedules

log = logging.getLogger("lvd.train")

CHECKPOINT_NAME = "checkpoint.pth"
TEACHER_EXPORT_NAME = "teacher_backbone.pth"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "lvd-pretrain-checkpoint"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped before the bad update and the last checkpoint is intact."""


@dataclass
class RunResult:
    start_step: int
    end_step: int
    losses: list[dict[str, float]] = field(default_factory=list)  # one per step run in this call
    checkpoint: Path | None = None
    teacher_export: Path | None = None
    images_per_second: float = 0.0
    bad_samples: int = 0
    images_seen: int = 0  # images the steps of this call trained on, over all ranks

    def summary(self) -> dict[str, Any]:
        """What `lvd pretrain` prints (and a Ray Train worker reports): steps, speed, first/last loss."""
        out: dict[str, Any] = {
            "steps": [self.start_step, self.end_step],
            "images_per_second": round(self.images_per_second, 2),
            "bad_samples": self.bad_samples,
            "images_seen": self.images_seen,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "teacher_export": str(self.teacher_export) if self.teacher_export else None,
            # How this process's torch threads waited between ops (embeddings/cpu_threads.py).
            "omp_wait_policy": omp_wait_policy(),
        }
        if self.losses:
            out["loss_first"] = round(self.losses[0]["total"], 4)
            out["loss_last"] = round(self.losses[-1]["total"], 4)
        return out


def keep_image(image: PIL.Image.Image) -> PIL.Image.Image:
    """Loader transform: the decoded RGB image itself; crops are made in the trainer (seeded per step)."""
    return image


def build_schedules_for(cfg: PretrainConfig, data_ranks: int) -> Schedules:
    o, t = cfg.optim, cfg.teacher
    return build_schedules(
        total_steps=cfg.total_steps,
        epoch_length=cfg.train.epoch_length,
        global_batch_size=cfg.train.batch_size_per_gpu * data_ranks,
        base_lr=o.base_lr,
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher,
        warmup_teacher_temp=t.warmup_teacher_temp,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
    )


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: never a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointRefused(ValueError):
    """A checkpoint file holds more than tensors and plain containers: loading it could run code."""


def load_checkpoint(path: Path) -> dict:
    """A pretraining checkpoint, read with `weights_only=True`: tensors, numbers, strings and plain
    containers only, so a crafted file cannot run code when resumed or evaluated."""
    if not is_torch_save_file(path):
        raise ValueError(f"{path} is not a checkpoint (not a file torch.save wrote)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointRefused(
            f"{path}: refused to load, it holds objects other than tensors and plain containers "
            f"(loading it could run code): {str(err).splitlines()[0]}"
        ) from None


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _read_metrics(path: Path, before_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] < before_step]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _endless(loader) -> Iterator[list[PIL.Image.Image]]:
    while True:
        yield from loader


def data_ranks_of(cfg: PretrainConfig, env: DistEnv) -> range:
    """The data ranks this process trains: its share of `train.data_ranks` (default: one per process)."""
    total = cfg.train.data_ranks or env.world_size
    if total % env.world_size:
        raise ValueError(
            f"train.data_ranks={total} does not split over {env.world_size} process(es): "
            "give a multiple of the number of processes"
        )
    per_process = total // env.world_size
    return range(env.rank * per_process, (env.rank + 1) * per_process)


def join_slices(slices: list[torch.Tensor], views: int) -> torch.Tensor:
    """Several data ranks' view-major tensors ([views x b, ...] each) as one view-major batch: all
    slices' view 0, then all slices' view 1, ... (the layout augment_batch and the masks use)."""
    if len(slices) == 1:
        return slices[0]
    return torch.cat([chunk for v in range(views) for chunk in (t.chunk(views)[v] for t in slices)])


def export_teacher(cfg: PretrainConfig, teacher_state: dict, path: Path) -> Path:
    """The teacher backbone in the embed stage's "lvd" format (embeddings.checkpoints.save_lvd_backbone)."""
    from lvd.embeddings.checkpoints import save_lvd_backbone

    backbone = SSLMetaArch.build_network(cfg, drop_path_rate=0.0).backbone
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in teacher_state.items() if k.startswith(prefix)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lvd_backbone(backbone.eval(), path)
    return path


def pretrain(
    cfg: PretrainConfig,
    shards: str | list[str],
    output_dir: str | Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train (or continue training) on WebDataset shards; checkpoints and metrics go to `output_dir`.

    `stop_after`: stop at this global step (default: the schedule's end, cfg.total_steps). With
    `resume`, an existing checkpoint in `output_dir` is continued, including its data position.
    """
    output_dir = Path(output_dir)
    env: DistEnv = setup_distributed()
    threads_before = torch.get_num_threads()
    if cfg.compute.threads and env.device.type == "cpu":
        torch.set_num_threads(cfg.compute.threads)
    try:
        return _pretrain(cfg, shards, output_dir, env, resume=resume, stop_after=stop_after, on_step=on_step)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(
    cfg: PretrainConfig,
    shards: str | list[str],
    output_dir: Path,
    env: DistEnv,
    *,
    resume: bool,
    stop_after: int | None,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> RunResult:
    total = cfg.total_steps
    stop = total if stop_after is None else stop_after
    if not 0 < stop <= total:
        raise ValueError(f"stop_after={stop_after} outside the schedule's 1..{total} steps")
    tc = cfg.train
    torch.manual_seed(tc.seed)  # same initial weights on every rank
    model = SSLMetaArch(cfg).to(env.device)
    strategy = resolve_strategy(cfg.compute.distributed, env)
    student, teacher = wrap_networks(model.student, model.teacher, strategy, env)
    groups = param_groups(
        model.student_modules(),
        n_blocks=model.student.backbone.n_blocks,
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
    )
    optimizer = build_optimizer(fuse_groups(groups), (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    my_ranks = data_ranks_of(cfg, env)
    data_ranks = len(my_ranks) * env.world_size
    schedules = build_schedules_for(cfg, data_ranks)

    ckpt_path = output_dir / CHECKPOINT_NAME
    step, data_states = 0, [None] * len(my_ranks)
    saved: dict[str, int | None] = {"step": None}  # step of the checkpoint on disk
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not an lvd pretraining checkpoint")
        if ckpt["world_size"] != env.world_size:
            raise ValueError(f"checkpoint from {ckpt['world_size']} rank(s), this run has {env.world_size}")
        saved_ranks = ckpt.get("data_ranks", ckpt["world_size"])  # older checkpoints: one per process
        if saved_ranks != data_ranks:
            raise ValueError(f"checkpoint laid out for {saved_ranks} data rank(s), this run has {data_ranks}")
        load_model_state_dict(model.student, ckpt["student"], strategy)
        load_model_state_dict(model.teacher, ckpt["teacher"], strategy)
        model.dino_loss.load_state_dict(ckpt["dino_loss"])
        model.ibot_loss.load_state_dict(ckpt["ibot_loss"])
        load_optimizer_state_dict(model.student, optimizer, ckpt["optimizer"], strategy)
        step, data_states = int(ckpt["step"]), [ckpt["data"][d] for d in my_ranks]
        saved["step"] = step
        log.info("resuming %s at step %d", ckpt_path, step)
    if step >= stop:
        log.info("nothing to do: checkpoint at step %d, stop at %d", step, stop)

    from lvd.training.data import build_loader

    batch_size = tc.batch_size_per_gpu
    loaders = [
        build_loader(
            shards,
            keep_image,
            batch_size,
            epoch_samples=tc.epoch_length * batch_size * data_ranks,
            seed=tc.seed,
            shuffle_buffer=tc.shuffle_buffer,
            num_workers=tc.num_workers,
            rank=d,
            world_size=data_ranks,
            collate_fn=list,
            state=state,
        )
        for d, state in zip(my_ranks, data_states, strict=True)
    ]
    c = cfg.crops
    multicrop = MultiCrop(
        MultiCropConfig(
            c.global_crops_size,
            c.local_crops_size,
            c.global_crops_scale,
            c.local_crops_scale,
            c.local_crops_number,
        )
    )
    grid = c.global_crops_size // cfg.model.patch_size
    mask_generator = BlockMaskGenerator((grid, grid), max_num_patches=int(0.5 * grid * grid))
    autocast = autocast_context(env.device, cfg.compute.precision)
    metrics_path = output_dir / METRICS_NAME
    history = _read_metrics(metrics_path, step) if env.is_main else []
    result = RunResult(start_step=step, end_step=step)

    consumed = [loader.state_dict() for loader in loaders]  # data positions of the last batch trained on

    def save() -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "world_size": env.world_size,
            "data_ranks": data_ranks,
            "config": cfg.model_dump(mode="json"),
            "student": model_state_dict(model.student, strategy),
            "teacher": model_state_dict(model.teacher, strategy),
            "dino_loss": model.dino_loss.state_dict(),
            "ibot_loss": model.ibot_loss.state_dict(),
            "optimizer": optimizer_state_dict(model.student, optimizer, strategy),
            "data": [state for states in gather_objects(consumed, env) for state in states],
        }
        if env.is_main:
            save_atomic(state, ckpt_path)
            _write_metrics(metrics_path, history)
            result.checkpoint = ckpt_path
        saved["step"] = step

    model.train()
    pool = ThreadPoolExecutor(tc.augment_threads) if tc.augment_threads > 1 else None
    streams = [_endless(loader) for loader in loaders]
    ratio_range = tuple(cfg.ibot.mask_ratio_min_max)

    def prepare(at: int) -> tuple[int, dict[str, torch.Tensor], torch.Tensor, list[dict]]:
        """Inputs of step `at` and the loader positions after its batch (a pure function of `at`)."""
        n_images, crops, masks = 0, [], []
        for d, batches in zip(my_ranks, streams, strict=True):
            images = next(batches)
            n_images += len(images)
            crops.append(augment_batch(images, multicrop, seed=tc.seed, rank=d, step=at, pool=pool))
            mask_rng = np.random.default_rng([tc.seed, d, at, 0x4D41534B])
            masks.append(
                sample_masks(
                    2 * len(images), mask_generator, mask_rng, cfg.ibot.mask_sample_probability, ratio_range
                )
            )
        positions = [loader.state_dict() for loader in loaders]
        views = {"global_crops": 2, "local_crops": c.local_crops_number}
        joined = {k: join_slices([part[k] for part in crops], views[k]) for k in crops[0]}
        return n_images, joined, join_slices(masks, 2), positions

    # The next step's batch is read and cropped in a background thread while this step computes.
    ahead = ThreadPoolExecutor(1)
    pending = ahead.submit(prepare, step) if step < stop else None
    if env.is_main:
        params = sum(p.numel() for p in model.student.parameters())
        log.info(
            "pretraining %s (%.1fM student parameters) on %s, %s; steps %d-%d of %d, batch %d x %d data "
            "rank(s), %d processes; checkpoints in %s",
            cfg.model.arch,
            params / 1e6,
            shards if isinstance(shards, str) else f"{len(shards)} shard files",
            env.device,
            step,
            stop,
            total,
            batch_size,
            data_ranks,
            env.world_size,
            output_dir,
        )
    t0, images_seen = time.perf_counter(), 0
    try:
        while step < stop:
            n_images, crops, masks, data_position = pending.result()
            pending = ahead.submit(prepare, step + 1) if step + 1 < stop else None
            crops = {k: v.to(env.device, non_blocking=True) for k, v in crops.items()}
            masks = masks.to(env.device)
            torch.manual_seed(step_seed(tc.seed, env.rank, step))  # drop path
            values = schedules.at(step)
            apply_schedules(optimizer, values["lr"], values["weight_decay"], values["last_layer_lr"])
            optimizer.zero_grad(set_to_none=True)
            losses = model.forward_backward(
                crops,
                masks,
                values["teacher_temp"],
                student=student,
                teacher=teacher,
                autocast=autocast,
                koleo_groups=len(my_ranks),
            )
            stacked = mean_across_ranks(torch.stack([losses[k] for k in sorted(losses)]).float(), env)
            row = {k: float(v) for k, v in zip(sorted(losses), stacked.tolist(), strict=True)}
            if not all(math.isfinite(v) for v in row.values()):
                where = (
                    f"last good checkpoint: {ckpt_path} (step {saved['step']})"
                    if saved["step"] is not None
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}: {row}; stopped before updating; {where}"
                )
            if cfg.optim.clip_grad > 0:
                for module in model.student_modules().values():
                    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            model.update_teacher(values["momentum"])
            step += 1
            images_seen += n_images
            consumed = data_position
            row = {
                "step": step - 1,
                **row,
                **{k: values[k] for k in ("lr", "weight_decay", "momentum", "teacher_temp")},
            }
            result.losses.append(row)
            history.append(row)
            if on_step is not None:
                on_step(step - 1, row)
            if env.is_main and (step % tc.log_every == 0 or step == stop):
                elapsed = time.perf_counter() - t0
                done = step - result.start_step
                log.info(
                    "step %d/%d loss %.4f (dino %.4f ibot %.4f koleo %.4f) lr %.2e, %.1f img/s, ETA %s",
                    step,
                    total,
                    row["total"],
                    row["dino"],
                    row["ibot"],
                    row["koleo"],
                    row["lr"],
                    images_seen * env.world_size / elapsed,
                    _duration(elapsed / done * (stop - step)),
                )
            if step % tc.checkpoint_every == 0 or step == stop:
                save()
    finally:
        if pending is not None:
            pending.cancel()
        ahead.shutdown(wait=True)
        if pool is not None:
            pool.shutdown()
    elapsed = time.perf_counter() - t0
    result.end_step = step
    result.images_seen = images_seen * env.world_size
    result.images_per_second = images_seen * env.world_size / elapsed if elapsed > 0 and images_seen else 0.0
    result.bad_samples = sum(loader.bad_samples for loader in loaders)
    teacher_state = model_state_dict(model.teacher, strategy)  # collective under FSDP: every rank
    if env.is_main:
        if result.checkpoint is None and ckpt_path.exists():
            result.checkpoint = ckpt_path
        result.teacher_export = export_teacher(cfg, teacher_state, output_dir / TEACHER_EXPORT_NAME)
    return result
