"""A few real training steps of a tiny model on synthetic clips, under any engine.

Checks that the loop runs as launched: one process, ``torchrun`` (DDP) or DeepSpeed. Each
rank writes ``selfcheck-rank<r>.json`` (losses, world size, steps) and its final weights,
``selfcheck-rank<r>.weights.pt`` (the state dict), so a caller can verify tensor by tensor
that the ranks agree. Used by ``tests/test_distributed.py`` and CI::

    python -m mofo.bench.selfcheck --out /tmp/sc
    torchrun --standalone --nproc-per-node=2 -m mofo.bench.selfcheck --out /tmp/sc
    python -m mofo.bench.selfcheck --engine deepspeed --out /tmp/sc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mofo.bench.synthetic import SyntheticClipDataset
from mofo.config import load_config
from mofo.runtime.device import seed_everything
from mofo.runtime.distributed import cleanup_distributed, init_distributed, unwrap
from mofo.training.engine import train
from mofo.training.pretrain import pretrain_task

TINY_MODEL = {"size": "demo", "input_size": 16, "num_frames": 4, "sampling_rate": 1,
              "patch_size": 8, "tubelet_size": 2}


def save_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Write ``model``'s state dict (detached CPU copies) to ``path``; return its file name.

    Ranks and runs are compared tensor by tensor (:func:`load_weights`), not by a sum, which
    swapped or offsetting weights would pass."""
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    torch.save(state, path)
    return Path(path).name


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict written by :func:`save_weights` (tensors only, loaded weights-only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_selfcheck(out_dir: str | Path, engine_kind: str = "torch", epochs: int = 2,
                  n_clips: int = 16, batch_size: int = 4, accum_steps: int = 1) -> dict:
    """Train the tiny pretraining model; return (and write) this rank's summary.
    ``accum_steps`` micro-batches of ``batch_size`` make one optimizer step."""
    from mofo.models.build import build_pretrain_model
    from mofo.runtime.loader import make_loader

    torch.set_num_threads(1)
    engine_cfg = {**load_config()["engine"], "kind": engine_kind, "resume": False}
    ctx = init_distributed(engine_cfg)
    try:
        stage_cfg = {"epochs": epochs, "warmup_epochs": 0.5, "batch_size": batch_size,
                     "accum_steps": accum_steps, "base_lr": 1e-2, "min_lr": 1e-5, "warmup_lr": 1e-4,
                     "weight_decay": 0.05, "betas": [0.9, 0.95], "clip_grad": 1.0,
                     "checkpoint_every": 1, "log_interval": 1, "seed": 0}
        dataset = SyntheticClipDataset(n_clips, TINY_MODEL, mask_ratio=0.75)
        loader = make_loader(dataset, batch_size, 0, shuffle=True, seed=0, drop_last=True,
                             distributed=ctx.world_size > 1)
        seed_everything(0)
        model = build_pretrain_model(TINY_MODEL, depth=1, decoder_depth=1)
        result = train(model, loader, pretrain_task(TINY_MODEL, True), stage_cfg=stage_cfg,
                       engine_cfg=engine_cfg, ctx=ctx, out_dir=out_dir,
                       hash_config={"selfcheck": stage_cfg}, meta={"stage": "selfcheck"},
                       stage=f"selfcheck-{engine_kind}")
        weights = Path(out_dir) / f"selfcheck-rank{ctx.info.rank}.weights.pt"
        summary = {"rank": ctx.info.rank, "world_size": ctx.world_size, "engine": engine_kind,
                   "backend": ctx.backend, "steps": result.global_step, "losses": result.losses,
                   "weights": save_weights(unwrap(model), weights), "status": result.status}
        path = Path(out_dir) / f"selfcheck-rank{ctx.info.rank}.json"
        path.write_text(json.dumps(summary))
        return summary
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", default="torch", choices=["torch", "deepspeed"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="clips per micro-batch")
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="micro-batches per optimizer step (gradient accumulation)")
    args = parser.parse_args(argv)
    summary = run_selfcheck(args.out, args.engine, args.epochs, batch_size=args.batch_size,
                            accum_steps=args.accum_steps)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
