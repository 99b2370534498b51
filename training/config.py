"""Training configuration: DINOv2's recipe defaults, overridden by a YAML config (training/configs/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONFIG_DIR = Path(__file__).parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    arch: str = "vit_small"
    patch_size: int = 14
    num_register_tokens: int = 0
    drop_path_rate: float = 0.1
    layerscale_init: float = 1e-5
    ffn_layer: str = "auto"


class DinoConfig(_Section):
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    koleo_loss_weight: float = 0.1


class IbotConfig(_Section):
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3


class TrainConfig(_Section):
    batch_size_per_gpu: int = 64
    epoch_length: int = 1250  # steps per "epoch" (DINOv2's OFFICIAL_EPOCH_LENGTH)
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    seed: int = 0
    num_workers: int = 8
    augment_threads: int = 4
    shuffle_buffer: int = 10000
    checkpoint_every: int = 1250
    log_every: int = 10
    # Ranks the global batch is laid out for (0: one per process). The global batch is data_ranks x
    # batch_size_per_gpu; each data rank reads its own shard streams and crops, masks and applies
    # KoLeo to its slice as one process of a data_ranks-process run does. A process trains
    # data_ranks / processes of them in one pass, so one process with data_ranks: 2 computes the
    # same steps as two processes (up to float summation order; drop path draws per process).
    data_ranks: int = Field(0, ge=0)


class TeacherConfig(_Section):
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30


class OptimConfig(_Section):
    epochs: float = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004  # for a global batch of 1024 (sqrt scaling)
    warmup_epochs: float = 10
    min_lr: float = 1e-6
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


class CropsConfig(_Section):
    global_crops_size: int = 224
    local_crops_size: int = 98
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    local_crops_number: int = 8


class ComputeConfig(_Section):
    # auto: bf16 autocast on CUDA, float32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto: DDP when launched with several processes; fsdp shards parameters (torch fully_shard).
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    # CPU intra-op threads while training (0: torch's default). One thread avoids OpenMP spin
    # contention when the CPU is shared with other work (e.g. Ray/Spark on the same node).
    threads: int = Field(0, ge=0)


class PretrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    dino: DinoConfig = Field(default_factory=DinoConfig)
    ibot: IbotConfig = Field(default_factory=IbotConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    @property
    def total_steps(self) -> int:
        return max(1, int(round(self.optim.epochs * self.train.epoch_length)))

    def with_total_steps(self, steps: int) -> PretrainConfig:
        """The same schedule shape over exactly `steps` steps: durations (warmups, last-layer freeze)
        are in epochs, so the epoch count is kept and each epoch is shrunk or stretched."""
        if steps < 1:
            raise ValueError("steps must be >= 1")
        epoch_length = max(1, round(steps / self.optim.epochs))
        return self.model_copy(
            update={
                "train": self.train.model_copy(update={"epoch_length": epoch_length}),
                "optim": self.optim.model_copy(update={"epochs": steps / epoch_length}),
            }
        )


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """A config by name (`tiny`, `vit_small`, ... in training/configs) or YAML path, then `overrides`
    (nested dict, e.g. {"train": {"batch_size_per_gpu": 8}}). Unknown keys are errors."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"no config {name_or_path!r}; built-in configs: {', '.join(available_configs())}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    return PretrainConfig.model_validate(_merge(data, overrides or {}))
