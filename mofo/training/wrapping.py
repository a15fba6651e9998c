"""The model as the training loop calls it: plain, DDP, DeepSpeed, and torch.compile on top.

:func:`wrap_model` is where ``engine.kind``, ``engine.compile`` and the process count decide
the wrapper; :func:`deepspeed_config` is DeepSpeed's JSON config for the same step (batch,
accumulation, clipping, autocast). Checkpoints never see a wrapper: they are written from
``mofo.runtime.distributed.unwrap(model)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mofo.runtime.device import AUTOCAST_DTYPE, uses_autocast
from mofo.runtime.distributed import DistContext


@dataclass
class Wrapped:
    """The model as the loop calls it plus the objects that step it."""

    model: nn.Module  # DDP / DeepSpeed engine / plain module
    optimizer: torch.optim.Optimizer
    ds_engine: Any | None


def deepspeed_config(stage_cfg: dict, engine_cfg: dict, batch_size: int, world: int,
                     accum_steps: int, device: torch.device) -> dict:
    """DeepSpeed's JSON config: fp32 weights, ZeRO 0, our client optimizer, clipping, and
    ``accum_steps`` micro-batches of ``batch_size`` per optimizer step.

    Where :func:`uses_autocast` holds, the config turns DeepSpeed's ``torch_autocast`` on:
    without it the engine's forward switches off the caller's autocast (DeepSpeed >= 0.16
    does, with a warning), and a "bf16" run trains in fp32 (``mofo bench gpu`` on an H200:
    half the clips/s of DDP, fp32's peak memory). ``lower_precision_safe_modules: []`` keeps
    every gradient's all-reduce in fp32, as DDP's; DeepSpeed's default would reduce the
    ``nn.Linear`` gradients in bf16.
    """
    ds_cfg = engine_cfg["deepspeed"]
    dtype = str(AUTOCAST_DTYPE).removeprefix("torch.")
    autocast = ({"torch_autocast": {"enabled": True, "dtype": dtype,
                                    "lower_precision_safe_modules": []}}
                if uses_autocast(engine_cfg, device) else {})
    return {
        **autocast,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": batch_size * world * accum_steps,
        "gradient_clipping": float(stage_cfg.get("clip_grad") or 0.0),
        "zero_optimization": {"stage": int(ds_cfg["zero_stage"])},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def wrap_model(
    model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext, stage_cfg: dict,
    engine_cfg: dict, batch_size: int, accum_steps: int,
) -> Wrapped:
    """DDP for several torch processes, ``deepspeed.initialize`` for DeepSpeed, else as is."""
    if ctx.kind == "deepspeed":
        import deepspeed

        if engine_cfg["compile"]:
            raise ValueError("engine.compile is for engine.kind torch; DeepSpeed compiles "
                             "through its own config (not used by mofo)")

        if int(engine_cfg["deepspeed"]["zero_stage"]) != 0:
            raise ValueError(
                "engine.deepspeed.zero_stage must be 0: mofo checkpoints hold full optimizer "
                "states (ViT-B fits on one GPU, so ZeRO sharding is not needed)"
            )
        ds_model, _ds_opt, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(stage_cfg, engine_cfg, batch_size, ctx.world_size,
                                    accum_steps, ctx.device),
        )
        return Wrapped(ds_model, optimizer, ds_model)
    if ctx.distributed and ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids,
            find_unused_parameters=bool(engine_cfg["find_unused_parameters"]),
        )
    if engine_cfg["compile"]:
        # Compiled around DDP, as torch recommends (its DDPOptimizer splits the graph at the
        # buckets); checkpoints keep the plain module's keys (unwrap strips _orig_mod.).
        print(f"[mofo] engine.compile: torch.compile(backend={engine_cfg['compile_backend']}); "
              "the first step compiles", file=sys.stderr, flush=True)
        model = torch.compile(model, backend=engine_cfg["compile_backend"])
    return Wrapped(model, optimizer, None)
