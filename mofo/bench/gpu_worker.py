"""The launched half of ``mofo bench gpu``: DDP and DeepSpeed pretraining steps in their own
process, as the training stages run them.

``ddp``: started by ``torchrun --standalone --nproc-per-node=1``; creates the process group
(NCCL on GPU, gloo on CPU), wraps the model in ``DistributedDataParallel`` (which the engine
skips for one process, so it is done here explicitly), checks that the DDP gradients equal
a plain backward of the same batch, then times optimizer steps.
``deepspeed``: one process; ``init_distributed`` + ``wrap_model`` with ``engine.kind:
deepspeed`` (as the engine does), then times ``engine.backward`` / ``engine.step``.

Both read a spec JSON (written by :mod:`mofo.bench.gpu`) and write a result JSON::

    torchrun --standalone --nproc-per-node=1 -m mofo.bench.gpu_worker ddp SPEC OUT
    python -m mofo.bench.gpu_worker deepspeed SPEC OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mofo.bench.gpu_presets import build_pretrainer, get_preset, pretrain_batch
from mofo.config import load_config
from mofo.runtime.device import autocast_context, seed_everything, to_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], float], device: torch.device, steps: int,
                clips: int) -> dict:
    """Run ``step`` (returns the loss) once to warm up, then ``steps`` times, timed."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, timings = [], []
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        if i > 0:
            timings.append(time.perf_counter() - t0)
        losses.append(loss)
    mean = sum(timings) / len(timings)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"clips_per_s": clips / mean, "step_s": mean, "batch": clips,
            "peak_memory_mb": peak, "losses": losses}


def watch_forward_autocast(model: torch.nn.Module, device: torch.device) -> dict:
    """Record, at each forward of ``model``, the autocast it runs under: ``{"autocast":
    "bfloat16"}`` (the dtype) or ``"off"``. A wrapper (DeepSpeed's engine) may switch the
    caller's autocast off before the forward; this sees what the model really got."""
    seen: dict = {}

    def hook(_module, _args) -> None:
        on = torch.is_autocast_enabled(device.type)
        seen["autocast"] = (str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
                            if on else "off")

    model.register_forward_pre_hook(hook)
    return seen


def max_grad_difference(model: torch.nn.Module, ddp: torch.nn.Module, task, batch: dict) -> float:
    """Largest |gradient| difference between a plain backward of ``model`` and a DDP backward
    of the same weights and batch (fp32; world size 1 divides the all-reduced sum by 1),
    relative to the largest plain |gradient|."""
    loss, _ = task(model, batch)
    loss.backward()
    plain = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, _ = task(ddp, batch)
    loss.backward()
    diffs = [float((p.grad - plain[n]).abs().max()) for n, p in model.named_parameters()
             if p.grad is not None]
    model.zero_grad(set_to_none=True)
    scale = max((float(g.abs().max()) for g in plain.values()), default=0.0)
    return max(diffs) / max(scale, 1e-12) if diffs else float("inf")


def run_ddp(spec: dict) -> dict:
    """One DDP process: NCCL on GPU, gloo on CPU; gradient check, then timed steps."""
    import torch.distributed as dist

    from mofo.runtime.distributed import backend_for, rank_info, select_device
    from mofo.training.optim import build_optimizer
    from mofo.training.pretrain import pretrain_task

    preset = get_preset(spec["preset"])
    info = rank_info()
    device = select_device({"device": spec["device"]}, info)
    backend = backend_for({"dist_backend": "auto"}, device)
    dist.init_process_group(backend=backend)
    try:
        seed_everything(0)
        model = build_pretrainer(preset).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        task = pretrain_task(preset.model, True)
        batch = to_device(pretrain_batch(preset, spec["masking"], "tube"), device)
        grad_diff = max_grad_difference(model, ddp, task, batch)
        optimizer = build_optimizer(model, spec["stage_cfg"], preset.pretrain_batch)
        seen = watch_forward_autocast(model, device)

        def step() -> float:
            with autocast_context({"precision": spec["precision"]}, device):
                loss, _ = task(ddp, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach().float().item())

        out = timed_steps(step, device, int(spec["steps"]), preset.pretrain_batch)
        return {**out, "backend": dist.get_backend(), "world_size": dist.get_world_size(),
                "rank_source": info.source, "grad_max_diff": grad_diff, "device": str(device),
                "forward_autocast": seen["autocast"]}
    finally:
        dist.destroy_process_group()


def run_deepspeed(spec: dict) -> dict:
    """One DeepSpeed process (ZeRO 0, fp32 weights, torch autocast): timed steps."""
    from mofo.runtime.distributed import cleanup_distributed, init_distributed
    from mofo.training.optim import build_optimizer
    from mofo.training.pretrain import pretrain_task
    from mofo.training.wrapping import wrap_model

    preset = get_preset(spec["preset"])
    engine_cfg = {**load_config()["engine"], "kind": "deepspeed", "device": spec["device"],
                  "precision": spec["precision"],
                  "torch_extensions_dir": spec["torch_extensions_dir"],
                  "deepspeed": {"zero_stage": 0}}
    ctx = init_distributed(engine_cfg)
    try:
        seed_everything(0)
        model = build_pretrainer(preset).to(ctx.device)
        optimizer = build_optimizer(model, spec["stage_cfg"], preset.pretrain_batch)
        wrapped = wrap_model(model, optimizer, ctx, spec["stage_cfg"], engine_cfg,
                             preset.pretrain_batch, accum_steps=1)
        task = pretrain_task(preset.model, True)
        batch = to_device(pretrain_batch(preset, spec["masking"], "tube"), ctx.device)
        seen = watch_forward_autocast(model, ctx.device)

        def step() -> float:
            with autocast_context(engine_cfg, ctx.device):
                loss, _ = task(wrapped.model, batch)
            wrapped.ds_engine.backward(loss)
            wrapped.ds_engine.step()
            return float(loss.detach().float().item())

        out = timed_steps(step, ctx.device, int(spec["steps"]), preset.pretrain_batch)
        return {**out, "backend": ctx.backend, "world_size": ctx.world_size,
                "device": str(ctx.device), "forward_autocast": seen["autocast"]}
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["ddp", "deepspeed"])
    parser.add_argument("spec", help="spec JSON written by mofo.bench.gpu")
    parser.add_argument("out", help="result JSON to write")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = (run_ddp if args.kind == "ddp" else run_deepspeed)(spec)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
