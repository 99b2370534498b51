"""Where a run executes: one process, torchrun (DDP or FSDP), or Ray Train workers on a Ray cluster."""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("lvd.train")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistEnv:
    """Join the process group torchrun or Ray Train describes (RANK/WORLD_SIZE/LOCAL_RANK, MASTER_ADDR);
    a plain `python` / `lvd pretrain` call is a single process. NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():  # Ray Train sets the group up itself
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if "LOCAL_RANK" not in os.environ and cuda:
            import ray.train.torch

            device = ray.train.torch.get_device()  # Ray assigns each worker its GPU
            return DistEnv(rank, world, device.index or 0, device)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(rank, world, local_rank, device)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (or when asked for), float32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    if not env.distributed:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def wrap_networks(
    student: nn.Module, teacher: nn.Module, strategy: str, env: DistEnv
) -> tuple[nn.Module, nn.Module]:
    """The networks the step calls: DDP around the student, or FSDP (`fully_shard`, per block then
    root) around student and teacher alike so the EMA pairs equally sharded parameters."""
    if strategy == "none":
        return student, teacher
    if strategy == "ddp":
        ids = [env.local_rank] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=ids), teacher
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mp_policy": mp} if env.device.type == "cuda" else {}
        for net in (student, teacher):
            for block in net.backbone.blocks:
                fully_shard(block, **kwargs)
            fully_shard(net, **kwargs)
        return student, teacher
    raise ValueError(f"unknown distributed strategy {strategy!r}")


def model_state_dict(module: nn.Module, strategy: str) -> dict:
    """A full (unsharded, CPU) state dict on every rank."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def load_model_state_dict(module: nn.Module, state: dict, strategy: str) -> None:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> dict:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, strategy: str
) -> None:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj` (e.g. loader positions), in rank order."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= env.world_size
    return x


# --- Ray Train ----------------------------------------------------------------------------------


def _ray_train_loop(loop_config: dict) -> None:
    # Runs inside each Ray Train worker; Ray has already created the torch process group.
    import sys

    import ray.train

    from lvd.training.config import PretrainConfig
    from lvd.training.train import pretrain

    if not logging.getLogger().handlers:  # step lines reach the driver's (and `lvd logs`') output
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    cfg = PretrainConfig.model_validate(loop_config["config"])
    result = pretrain(
        cfg,
        loop_config["shards"],
        loop_config["output_dir"],
        resume=loop_config["resume"],
        stop_after=loop_config["stop_after"],
    )
    # Every worker reports (Ray Train expects all to). Ray Train hands the driver only the metrics
    # that come with a checkpoint, so rank 0 attaches one holding just its summary.
    summary = result.summary()
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(summary)
        return
    with tempfile.TemporaryDirectory(prefix="lvd-summary-") as tmp:
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f)
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _absolute(path: str) -> str:
    """A local path made absolute (Ray Train workers run in their own working folders); URLs as given."""
    return path if "://" in path else os.path.abspath(path)


def launch_ray_train(
    cfg_dict: dict,
    shards: str,
    output_dir: str,
    *,
    num_workers: int,
    use_gpu: bool,
    resume: bool = True,
    stop_after: int | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Run the same training loop on `num_workers` Ray Train workers (one per GPU) of a Ray cluster;
    returns rank 0's run summary (RunResult.summary()).

    `output_dir` and the shards must be reachable from every node (shared or fsspec storage). Without
    `address`, joins the cluster in RAY_ADDRESS (set inside a submitted Ray job) or starts a local Ray.
    """
    from lvd.embeddings.cpu_threads import actor_env
    from lvd.jobs.engines import (
        LOOPBACK,
        check_ray_address,
        cluster_auth_env,
        local_env_defaults,
        local_ray_env,
    )

    address = address or os.environ.get("RAY_ADDRESS")
    # Before Ray is imported: it reads them then.
    if address:
        local_env_defaults()
        cluster_auth_env()
    else:
        local_ray_env()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        if address:
            check_ray_address(address)
            ray.init(address=address)
        else:  # as a local curation run: a new instance of our own, on loopback
            ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False)
    shards, output_dir = _absolute(shards), _absolute(output_dir)
    loop_config = {
        "config": cfg_dict,
        "shards": shards,
        "output_dir": output_dir,
        "resume": resume,
        "stop_after": stop_after,
    }
    run_options: dict[str, Any] = {}
    if "worker_runtime_env" in inspect.signature(RunConfig).parameters:  # Ray Train v2
        # Ray Train imports torch in its workers before the loop runs: the OpenMP wait policy
        # (embeddings/cpu_threads.py) must be in their environment when they start.
        run_options["worker_runtime_env"] = {"env_vars": actor_env()}
    else:
        log.warning("Ray Train v1: its workers run with OpenMP's default wait policy (threads spin)")
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        # A new name per launch: Ray Train would otherwise treat a second launch as a restart of the first.
        run_config=RunConfig(
            name=f"lvd-pretrain-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=os.path.join(output_dir, "ray"),
            **run_options,
        ),
    )
    return dict(trainer.fit().metrics or {})
