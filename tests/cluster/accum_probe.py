"""One rank of a 2-process torchrun: gradient accumulation under DDP.

Trains the self-check's tiny model (drop path off) twice in the same process group: 4 clips
per rank and optimizer step as one micro-batch of 4, then as 2 micro-batches of 2
(``accum_steps: 2``). A DDP communication hook counts the gradient all-reduces of each run.
Writes ``<out>/accum-rank<r>.json``: per run the optimizer steps, the all-reduce count, the
losses and the file of the final weights (``<out>/<run>/weights-rank<r>.pt``, a state dict). Started by ``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from mofo.bench.selfcheck import TINY_MODEL, save_weights
from mofo.bench.synthetic import SyntheticClipDataset
from mofo.config import load_config
from mofo.models.build import build_pretrain_model
from mofo.runtime.device import seed_everything
from mofo.runtime.distributed import cleanup_distributed, init_distributed
from mofo.runtime.loader import make_loader
from mofo.training import engine
from mofo.training.pretrain import pretrain_task


def run_once(ctx, out: Path, batch_size: int, accum_steps: int) -> dict:
    calls = {"n": 0}

    def counting_hook(state, bucket):
        calls["n"] += 1
        return allreduce_hook(state, bucket)

    original = engine.wrap_model

    def wrap_and_count(*args, **kwargs):
        wrapped = original(*args, **kwargs)
        wrapped.model.register_comm_hook(None, counting_hook)
        return wrapped

    stage_cfg = {"epochs": 2, "warmup_epochs": 0.5, "batch_size": batch_size,
                 "accum_steps": accum_steps, "base_lr": 1e-2, "min_lr": 1e-5, "warmup_lr": 1e-4,
                 "weight_decay": 0.05, "betas": [0.9, 0.95], "clip_grad": 1.0,
                 "checkpoint_every": 1, "log_interval": 1, "seed": 0}
    loader = make_loader(SyntheticClipDataset(16, TINY_MODEL, mask_ratio=0.75), batch_size, 0,
                         shuffle=True, seed=0, drop_last=True, distributed=True)
    seed_everything(0)
    model = build_pretrain_model(TINY_MODEL, depth=1, decoder_depth=1)
    engine.wrap_model = wrap_and_count
    try:
        result = engine.train(model, loader, pretrain_task(TINY_MODEL, True), stage_cfg=stage_cfg,
                              engine_cfg={**load_config()["engine"], "resume": False}, ctx=ctx, out_dir=out,
                              hash_config={"probe": stage_cfg}, stage="accum-probe")
    finally:
        engine.wrap_model = original
    return {"steps": result.global_step, "allreduces": calls["n"],
            "weights": str(out / save_weights(model, out / f"weights-rank{ctx.info.rank}.pt")),
            "losses": result.losses}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed({**load_config()["engine"], "device": "cpu", "dist_backend": "gloo"})
    try:
        out = Path(out_dir)
        record = {"world_size": ctx.world_size,
                  "plain": run_once(ctx, out / "plain", 4, 1),
                  "accumulated": run_once(ctx, out / "accumulated", 2, 2)}
        (out / f"accum-rank{ctx.info.rank}.json").write_text(json.dumps(record))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
