"""Training throughput benchmark: model clips/s and peak memory, beside the loader's clip rate.

``run_training_benchmark(config)`` times ``steps`` optimizer steps of the configured model
(pretraining and fine-tuning with each head) on synthetic clips of the right shape, and --
when the manifest and frame stores exist -- how many clips/s the real data loader delivers
in pretraining and fine-tuning mode. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU
(reset per row); on CPU the process's peak resident set size (``resource.getrusage``), which
never decreases, so each row is the peak up to and including that row.

    python -m mofo.training.bench [--config overlay.yaml] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from torch.utils.data import DataLoader

from mofo.config import dataset_results_dir, load_config
from mofo.models.build import build_model
from mofo.training.distributed import rank_info, select_device
from mofo.training.engine import autocast_context, seed_everything, to_device
from mofo.training.finetune import finetune_task
from mofo.training.mixup import VideoMixup
from mofo.training.optim import build_optimizer
from mofo.training.pretrain import pretrain_task
from mofo.training.synthetic import SyntheticClipDataset


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_model_steps(model: torch.nn.Module, task, batch: dict, stage_cfg: dict,
                     engine_cfg: dict, device: torch.device, steps: int) -> dict:
    """clips/s of forward + backward + AdamW step (after one warm-up step)."""
    model.to(device).train()
    optimizer = build_optimizer(model, stage_cfg, int(stage_cfg["batch_size"]))
    batch = to_device(batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast_context(engine_cfg, device):
            loss, _ = task(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first step pays for allocations and kernel selection
            timings.append(time.perf_counter() - t0)
    n = int(batch["frames"].shape[0])
    return {"clips_per_s": n * len(timings) / sum(timings), "step_s": sum(timings) / len(timings),
            "batch": n, "peak_memory_mb": peak_memory_mb(device)}


def time_loader(config: dict, mode: str, batch_size: int, num_workers: int, batches: int) -> dict:
    """clips/s the real loader delivers (first batch excluded: worker start-up)."""
    from mofo.training import data as data_io

    root = dataset_results_dir(config)
    dataset = data_io.build_dataset(config, root / "manifest.csv", root, "train", mode)
    loader = data_io.build_loader(dataset, batch_size, num_workers, shuffle=True, seed=0,
                                  drop_last=True, distributed=False)
    it = iter(loader)
    next(it)
    t0, clips = time.perf_counter(), 0
    for _ in range(batches):
        try:
            clips += int(next(it)["frames"].shape[0])
        except StopIteration:
            break
    seconds = time.perf_counter() - t0
    return {"clips_per_s": clips / max(seconds, 1e-9), "clips": clips, "workers": num_workers}


def synthetic_batch(config: dict, batch_size: int, heads: dict[str, int]) -> dict:
    ds = SyntheticClipDataset(batch_size, config["model"], num_classes=heads.get("label", 2),
                              mask_ratio=float(config["masking"]["ratio"]))
    batch = next(iter(DataLoader(ds, batch_size=batch_size)))
    if "verb" in heads:
        batch["verb"] = batch["label"] % heads["verb"]
        batch["noun"] = batch["label"] % heads["noun"]
    return batch


def run_training_benchmark(config: dict, steps: int = 5, loader_batches: int = 4) -> dict:
    """Model and loader throughput for the configured model; prints and returns a dict."""
    device = select_device(config["engine"], rank_info())
    engine_cfg = config["engine"]
    heads = ({"verb": 97, "noun": 300} if config["dataset"]["name"] == "epic100" else
             {"label": 174 if config["dataset"]["name"] == "ssv2" else
              len(config["dataset"]["demo"]["classes"])})
    out: dict = {"device": str(device), "model_size": config["model"]["size"],
                 "input": [config["model"]["num_frames"], config["model"]["input_size"]],
                 "threads": torch.get_num_threads()}
    from mofo.models.build import build_pretrain_model

    pre = config["pretrain"]
    seed_everything(0)
    batch = synthetic_batch(config, int(pre["batch_size"]), heads)
    out["pretrain_model"] = time_model_steps(
        build_pretrain_model(config["model"]), pretrain_task(config["model"], True), batch,
        pre, engine_cfg, device, steps)
    ft = config["finetune"]
    batch = synthetic_batch(config, int(ft["batch_size"]), heads)
    for head in ("mean", "mca"):
        from mofo.masking.grid import token_grid

        mixer = VideoMixup(ft, heads, token_grid(config["model"]), config["model"]["patch_size"])
        out[f"finetune_{head}_model"] = time_model_steps(
            build_model(config, heads, head), finetune_task(heads, mixer, 0.1), batch, ft,
            engine_cfg, device, steps)
    root = dataset_results_dir(config)
    if (root / "manifest.csv").exists() and (root / "boxes").exists():
        for mode, cfg in (("pretrain", pre), ("finetune", ft)):
            try:
                out[f"{mode}_loader"] = time_loader(config, mode, int(cfg["batch_size"]),
                                                    int(cfg["num_workers"]), loader_batches)
            except Exception as exc:  # noqa: BLE001 - a missing stage output is reported
                out[f"{mode}_loader"] = {"error": str(exc)}
    else:
        out["loader"] = f"skipped: no {root}/manifest.csv and boxes (run the pipeline first)"
    print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="training throughput benchmark")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    run_training_benchmark(load_config(args.config), steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
