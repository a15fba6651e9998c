"""Process-group set-up shared by the single-process, torchrun (DDP) and DeepSpeed engines.

Rank variables are read from torchrun (``RANK``/``LOCAL_RANK``/``WORLD_SIZE``) first and from
SLURM (``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``) second, so a job step started with
``srun python -m mofo.training.pretrain`` and one started with ``torchrun`` both work.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job; ``source`` says which variables were used."""

    rank: int
    local_rank: int
    world_size: int
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info(env: dict[str, str] | None = None) -> RankInfo:
    """Rank, local rank and world size from torchrun's variables, then SLURM's, else 0/0/1."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(
            int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun"
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return RankInfo(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]), "slurm",
        )
    return RankInfo(0, 0, 1, "single")


def free_port() -> int:
    """A TCP port that is free right now on this host (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def export_rank_env(info: RankInfo, master_port: int | None = None) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT where missing.

    torch's ``env://`` rendezvous and DeepSpeed need them even for one process. Under SLURM
    without torchrun, MASTER_ADDR defaults to this host, which is right for one node only;
    multi-node SLURM jobs must export MASTER_ADDR (the first host of the allocation).
    """
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A single process can take any free port; several processes must agree on one.
        port = free_port() if info.world_size == 1 else (master_port or 29500)
        os.environ["MASTER_PORT"] = str(port)


def select_device(engine_cfg: dict, info: RankInfo) -> torch.device:
    """``engine.device``: auto -> cuda:<local rank> when a GPU is visible, else cpu."""
    want = engine_cfg["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is 'cuda' but no CUDA device is visible")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        index = info.local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def apply_cpu_threads(engine_cfg: dict) -> None:
    """``engine.cpu_threads`` > 0: torch intra-op threads (small CPU jobs on a shared machine
    can be faster on fewer threads); 0 leaves torch's default."""
    threads = int(engine_cfg["cpu_threads"])
    if threads > 0:
        torch.set_num_threads(threads)


def backend_for(engine_cfg: dict, device: torch.device) -> str:
    """``engine.dist_backend``: auto -> nccl on GPU, gloo on CPU."""
    backend = engine_cfg["dist_backend"]
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def setup_torch_extensions_dir(engine_cfg: dict) -> Path:
    """Point TORCH_EXTENSIONS_DIR at a persistent cache so DeepSpeed compiles its ops once."""
    path = Path(
        os.environ.get("TORCH_EXTENSIONS_DIR")
        or os.path.expanduser(engine_cfg["torch_extensions_dir"])
    )
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


@dataclass
class DistContext:
    """What the engine needs to know about the job once the process group is up."""

    info: RankInfo
    device: torch.device
    backend: str | None  # None when no process group was created (single process, torch)
    kind: str  # "torch" | "deepspeed"

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(engine_cfg: dict) -> DistContext:
    """Create the process group this engine needs (none for one plain torch process)."""
    info = rank_info()
    apply_cpu_threads(engine_cfg)
    kind = engine_cfg["kind"]
    device = select_device(engine_cfg, info)
    backend = backend_for(engine_cfg, device)
    if kind == "deepspeed":
        setup_torch_extensions_dir(engine_cfg)
        export_rank_env(info, engine_cfg.get("master_port"))
        import deepspeed  # heavy import; only when asked for

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=backend)
        return DistContext(info, device, backend, kind)
    if info.world_size > 1:
        export_rank_env(info, engine_cfg.get("master_port"))
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
        return DistContext(info, device, backend, kind)
    return DistContext(info, device, None, kind)


def cleanup_distributed() -> None:
    """Tear the process group down (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float tensor over all ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DeepSpeed / ``torch.compile`` wrappers, so that weights
    are saved and loaded without a wrapper's key prefix (``module.``, ``_orig_mod.``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)  # DDP, DeepSpeed
        if not isinstance(inner, nn.Module):
            return model
        model = inner
