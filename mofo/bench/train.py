"""Training throughput benchmark: model clips/s and peak memory, beside the loader's clip rate.

``run_training_benchmark(config)`` times ``steps`` optimizer steps of the configured model
(pretraining and fine-tuning with each head) on synthetic clips of the right shape,
pretraining once per masking strategy side by side (tokens per clip through the encoder and
the decoder, step time: ``time_pretrain_strategies``), and --
when the manifest and frame stores exist -- how many clips/s the real data loader delivers
in pretraining and fine-tuning mode. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU
(reset per row); on CPU the process's peak resident set size (``resource.getrusage``), which
never decreases, so each row is the peak up to and including that row.

    python -m mofo.bench.train [--config overlay.yaml] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mofo.bench.flops import step_flops
from mofo.bench.synthetic import SyntheticClipDataset
from mofo.config import deep_merge, load_config
from mofo.masking import STRATEGY_NAMES, is_model_side, mask_from_config, needs_token_flow
from mofo.masking.grid import token_grid
from mofo.models.build import build_model, build_pretrain_model
from mofo.paths import pattern, results_root
from mofo.runtime.device import autocast_context, seed_everything, to_device
from mofo.runtime.distributed import rank_info, select_device
from mofo.training.finetune import finetune_task
from mofo.training.mixup import VideoMixup
from mofo.training.optim import build_optimizer
from mofo.training.pretrain import mme_dims, pretrain_masks, pretrain_task


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_step(model: torch.nn.Module, task, batch: dict, optimizer, engine_cfg: dict,
               device: torch.device) -> float:
    """Seconds of one forward + backward + optimizer step (device synchronised)."""
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
    return time.perf_counter() - t0


def time_model_steps(model: torch.nn.Module, task, batch: dict, stage_cfg: dict,
                     engine_cfg: dict, device: torch.device, steps: int) -> dict:
    """clips/s of forward + backward + AdamW step (after one warm-up step), and the step's
    FLOPs per clip, counted on one extra forward + backward before the timing
    (:func:`mofo.bench.flops.step_flops`). With ``engine_cfg["compile"]`` the timed model is
    ``torch.compile``'d as training does it, and ``first_step_s`` (the warm-up step) is the
    compile time plus one step."""
    model.to(device).train()
    optimizer = build_optimizer(model, stage_cfg, int(stage_cfg["batch_size"]))
    batch = to_device(batch, device)
    n = int(batch["frames"].shape[0])
    gflop_per_clip = step_flops(model, task, batch, engine_cfg, device) / n / 1e9
    if engine_cfg["compile"]:
        model = torch.compile(model, backend=engine_cfg["compile_backend"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = [timed_step(model, task, batch, optimizer, engine_cfg, device)
               for _ in range(steps + 1)]
    first, timings = timings[0], timings[1:]  # the first pays for allocations and kernels
    clips_per_s = n * len(timings) / sum(timings)
    return {"clips_per_s": clips_per_s, "step_s": sum(timings) / len(timings), "first_step_s": first,
            "batch": n, "peak_memory_mb": peak_memory_mb(device),
            "gflop_per_clip": gflop_per_clip, "tflops": gflop_per_clip * clips_per_s / 1000}


def box_flags(batch: int, grid: tuple[int, int, int], box_fraction: float, seed: int = 0) -> torch.Tensor:
    """In-box flags ``(batch, t*h*w)``: per clip one box of ~``box_fraction`` of each frame's
    cells (sides jittered by one cell, position random), the same box in every frame."""
    t, h, w = grid
    gen = torch.Generator().manual_seed(seed)
    side_h = max(1, round(h * box_fraction**0.5))
    side_w = max(1, round(w * box_fraction**0.5))
    flags = torch.zeros(batch, t, h, w, dtype=torch.bool)
    for i in range(batch):
        bh = min(h, max(1, side_h + int(torch.randint(-1, 2, (1,), generator=gen))))
        bw = min(w, max(1, side_w + int(torch.randint(-1, 2, (1,), generator=gen))))
        y = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
        flags[i, :, y : y + bh, x : x + bw] = True
    return flags.reshape(batch, -1)


def mca_head_flops(inbox: torch.Tensor, dim: int, mlp_ratio: float = 4.0,
                   groups: int | None = None) -> dict:
    """Matrix-product FLOPs (2 per multiply-add) of one forward + backward of the MCA head's
    cross block on the in-box flags ``inbox (B, N)``, for the per-clip loop and for the
    batched head; in GFLOP.

    Per clip with ``q`` in-box queries and ``k`` keys (the out-of-box tokens; the in-box ones
    when there are none), forward: q projection ``2 q D^2``, k and v ``4 k D^2``, scores and
    weighted sum ``4 q k D`` (all heads), output projection ``2 q D^2``, MLP ``fc1`` and
    ``fc2`` ``2 q D H`` each (``H = mlp_ratio * D``). The batched head runs ``fc2`` once per
    clip on the mean hidden row (``2 D H``) and pads the attention to the largest ``q`` and
    ``k`` of its group (clips sorted by ``q``, cut into ``groups``, default
    ``mofo.models.heads.ATTENTION_GROUPS``). Backward: twice the forward (a gradient for the
    input and one for the weights of every product). ``irreducible``: the loop's FLOPs
    without ``fc2``, the least that any exact computation of the pooled output needs that
    keeps every query's attention, projection and ``fc1`` (each is followed by a per-token
    non-linearity: softmax, LayerNorm, GELU). Clips without in-box tokens cost the loop
    nothing; the batched head gives them one key and an ``fc2`` row.
    """
    from mofo.models.heads import ATTENTION_GROUPS

    n = inbox.shape[1]
    q = inbox.to(torch.bool).sum(1).double().sort().values  # the head's group order
    k = torch.where(q == 0, 1.0, torch.where(q < n, n - q, q))  # no box: one dummy key
    d, h = float(dim), float(dim) * mlp_ratio
    linear = 2 * q * d * d + 4 * k * d * d + 2 * q * d * d + 2 * q * d * h
    attention = 4 * q * k * d
    cuts = min(groups or ATTENTION_GROUPS, len(q))
    padded = sum(len(qs) * 4 * float(qs.max() * ks.max()) * d
                 for qs, ks in zip(q.tensor_split(cuts), k.tensor_split(cuts), strict=True))
    boxed = q > 0  # the loop skips clips without a box (they take the mean of their tokens)
    irreducible = 3 * float((linear + attention)[boxed].sum())
    loop = irreducible + 3 * float((2 * q * d * h).sum())
    batched = 3 * (float(linear.sum()) + padded + len(q) * 2 * d * h)
    return {"loop_gflop": loop / 1e9, "batched_gflop": batched / 1e9,
            "irreducible_gflop": irreducible / 1e9,
            "loop_over_irreducible": loop / max(irreducible, 1.0)}


def time_mca_head(batch: int, grid: tuple[int, int, int], dim: int, num_heads: int = 3,
                  box_fraction: float = 0.25, repeats: int = 5, seed: int = 0) -> dict:
    """Forward + backward seconds of the batched MCA head (``pooled_features``) and of a
    per-clip loop with the same weights (``mca_per_sample``), timed alternately on the same
    tokens (so that a busy machine slows both alike) after one warm-up each; medians of the
    wall-clock (``*_s``) and of the process's CPU time (``*_cpu_s``: steadier than the wall
    clock when other processes share the cores; the same with one torch thread on an idle
    machine), beside the FLOP counts of :func:`mca_head_flops`."""
    from mofo.models.heads import MotionCrossAttentionHead, mca_per_sample

    torch.manual_seed(seed)
    head = MotionCrossAttentionHead(dim, 2, num_heads=num_heads).train()
    tokens = torch.randn(batch, math.prod(grid), dim, requires_grad=True)
    inbox = box_flags(batch, grid, box_fraction, seed)
    runs = {"batched": lambda: head.pooled_features(tokens, inbox),
            "per_clip_loop": lambda: mca_per_sample(head, tokens, inbox)}
    with torch.no_grad():
        max_abs_diff = float((runs["batched"]() - runs["per_clip_loop"]()).abs().max())
    times: dict[str, list[float]] = {f"{name}{kind}": [] for name in runs for kind in ("", "_cpu")}
    for i in range(repeats + 1):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run().sum().backward()
            if i > 0:  # the first round pays for allocations
                times[name].append(time.perf_counter() - t0)
                times[f"{name}_cpu"].append(time.process_time() - c0)
            tokens.grad = None
            head.zero_grad(set_to_none=True)
    med = {f"{name}_s": statistics.median(ts) for name, ts in times.items()}
    return {"batch": batch, "tokens": math.prod(grid), "dim": dim, "heads": num_heads,
            "in_box_mean": float(inbox.sum(1).float().mean()), "threads": torch.get_num_threads(),
            "repeats": repeats, **med,
            "loop_over_batched": med["per_clip_loop_s"] / med["batched_s"],
            "loop_over_batched_cpu": med["per_clip_loop_cpu_s"] / med["batched_cpu_s"],
            "max_abs_diff": max_abs_diff, **mca_head_flops(inbox, dim), "all_s": times}


def mca_head_summary(result: dict) -> str:
    """One line: the head's forward + backward time beside the per-clip loop's, and FLOPs."""
    return (f"MCA head forward+backward, median of {result['repeats']}: batched "
            f"{result['batched_s']:.3f} s (CPU {result['batched_cpu_s']:.3f} s), per-clip loop "
            f"{result['per_clip_loop_s']:.3f} s (CPU {result['per_clip_loop_cpu_s']:.3f} s); "
            f"loop / batched = {result['loop_over_batched']:.2f} "
            f"(CPU time {result['loop_over_batched_cpu']:.2f}); GFLOP loop "
            f"{result['loop_gflop']:.3g}, batched {result['batched_gflop']:.3g}, least exact "
            f"{result['irreducible_gflop']:.3g} (at most {result['loop_over_irreducible']:.2f}x "
            "faster than the loop at its FLOP rate)")


def strategy_batch(config: dict, strategy: str, frames: torch.Tensor, inbox: torch.Tensor,
                   seed: int = 0) -> dict:
    """A pretraining batch for ``strategy``: the clips, their in-box flags and, for a
    loader-side strategy, one mask per clip drawn as the loader draws it
    (``mask_from_config``, generator seeded by ``(seed, clip)``); a model-side strategy gets
    no mask (the task selects). A loader-side strategy that needs more than the in-box flags
    adds its input here: a flow strategy (``mgmae``) gets, for the pooled flow of real clips, a
    uniform translation of half a token cell per frame."""
    masking_cfg = {**config["masking"], "strategy": strategy}
    batch = {"frames": frames, "inbox": inbox}
    if is_model_side(strategy):
        return batch
    grid = token_grid(config["model"])
    flow = None
    if needs_token_flow(strategy):
        flow = np.zeros((int(config["model"]["num_frames"]) - 1, grid[1], grid[2], 2))
        flow[..., 0] = 0.5
    masks = [mask_from_config(masking_cfg, grid, flags.numpy(), np.random.default_rng([seed, i]),
                              token_flow=flow)
             for i, flags in enumerate(inbox)]
    return {**batch, "mask": torch.from_numpy(np.stack(masks))}


def time_pretrain_strategies(config: dict, steps: int = 5,
                             strategies: Sequence[str] = STRATEGY_NAMES,
                             batch_size: int | None = None) -> dict:
    """Tokens per clip and step time of pretraining with each masking strategy, side by side.

    The same initial weights, clips and in-box flags (synthetic, one box per clip) for every
    strategy; one optimizer step per strategy in turn, ``steps + 1`` rounds (so that a busy
    machine slows all alike), the first round dropped; medians. Per strategy:
    ``encoder_tokens`` (visible), ``target_tokens`` (reconstructed, in the loss),
    ``dropped_tokens`` (neither), ``decoder_tokens`` (visible + target), ``step_s`` and
    ``step_vs_first`` (its median over the first strategy's).
    """
    device = select_device(config["engine"], rank_info())
    pre, model_cfg = config["pretrain"], config["model"]
    n = int(batch_size or pre["batch_size"])
    grid = token_grid(model_cfg)
    seed_everything(0)
    frames = synthetic_batch(config, n, {"label": 2})["frames"]
    inbox = box_flags(n, grid, 0.25)
    runs = {}
    for strategy in strategies:
        seed_everything(0)  # the same initial weights for every strategy
        model = build_pretrain_model(model_cfg).to(device).train()
        masking_cfg = {**config["masking"], "strategy": strategy}
        batch = to_device(strategy_batch(config, strategy, frames, inbox), device)
        with torch.no_grad():
            hidden, target = pretrain_masks(model, batch, masking_cfg)
        runs[strategy] = {
            "model": model, "batch": batch, "optimizer": build_optimizer(model, pre, n),
            "task": pretrain_task(model_cfg, bool(pre["normalize_target"]), masking_cfg),
            "tokens": {"encoder_tokens": int((~hidden[0]).sum()),
                       "target_tokens": int(target[0].sum()),
                       "dropped_tokens": int((hidden[0] & ~target[0]).sum()),
                       "decoder_tokens": int((~hidden[0]).sum() + target[0].sum())}}
    times: dict[str, list[float]] = {s: [] for s in runs}
    for i in range(steps + 1):
        for strategy, r in runs.items():
            seconds = timed_step(r["model"], r["task"], r["batch"], r["optimizer"],
                                 config["engine"], device)
            if i > 0:
                times[strategy].append(seconds)
    first = statistics.median(times[next(iter(runs))])
    return {"device": str(device), "batch": n, "tokens_per_clip": math.prod(grid),
            "threads": torch.get_num_threads(), "steps": steps,
            "strategies": {s: {**r["tokens"], "step_s": statistics.median(times[s]),
                               "step_vs_first": statistics.median(times[s]) / first}
                           for s, r in runs.items()}}


def format_strategy_table(result: dict) -> str:
    """The :func:`time_pretrain_strategies` figures as a text table, one row per strategy."""
    head = (f"pretraining by masking strategy ({result['tokens_per_clip']} tokens per clip, "
            f"batch {result['batch']}, {result['device']}, median of {result['steps']} steps)")
    cols = ["encoder_tokens", "decoder_tokens", "target_tokens", "dropped_tokens"]
    lines = [head, f"{'strategy':<10}" + "".join(f"{c:>16}" for c in cols)
             + f"{'step_s':>10}{'vs first':>10}"]
    for name, row in result["strategies"].items():
        lines.append(f"{name:<10}" + "".join(f"{row[c]:>16}" for c in cols)
                     + f"{row['step_s']:>10.4f}{row['step_vs_first']:>10.2f}")
    return "\n".join(lines)


def time_loader(config: dict, mode: str, batch_size: int, num_workers: int, batches: int) -> dict:
    """clips/s the real loader delivers (first batch excluded: worker start-up)."""
    from mofo.runtime import data as data_io

    root = results_root(config)
    dataset = data_io.build_dataset(config, pattern("manifest", root), root, "train", mode)
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


def with_trajectories(batch: dict, config: dict, seed: int = 0) -> dict:
    """``batch`` plus random MME trajectory targets of the dataset's shapes (``(B, N, P, L,
    2)`` model px, 80 % of the point steps valid), for timing the mme target."""
    gen = torch.Generator().manual_seed(seed)
    b, n = batch["mask"].shape
    points = (int(config["model"]["patch_size"]) // int(config["pretrain"]["mme"]["cell"])) ** 2
    shape = (b, n, points, int(config["trajectories"]["steps"]))
    return {**batch, "trajectories": torch.randn(*shape, 2, generator=gen) * 2,
            "trajectory_valid": torch.rand(*shape, generator=gen) < 0.8}


def synthetic_batch(config: dict, batch_size: int, heads: dict[str, int]) -> dict:
    ds = SyntheticClipDataset(batch_size, config["model"], num_classes=heads.get("label", 2),
                              mask_ratio=float(config["masking"]["ratio"]))
    batch = next(iter(DataLoader(ds, batch_size=batch_size)))
    if "verb" in heads:
        batch["verb"] = batch["label"] % heads["verb"]
        batch["noun"] = batch["label"] % heads["noun"]
    return batch


def run_training_benchmark(config: dict, steps: int = 5, loader_batches: int = 4,
                           strategies: Sequence[str] = STRATEGY_NAMES) -> dict:
    """Model and loader throughput for the configured model, and pretraining per masking
    strategy side by side (:func:`time_pretrain_strategies`); prints and returns a dict."""
    device = select_device(config["engine"], rank_info())
    engine_cfg = config["engine"]
    heads = ({"verb": 97, "noun": 300} if config["dataset"]["name"] == "epic100" else
             {"label": 174 if config["dataset"]["name"] == "ssv2" else
              len(config["dataset"]["demo"]["classes"])})
    out: dict = {"device": str(device), "model_size": config["model"]["size"],
                 "input": [config["model"]["num_frames"], config["model"]["input_size"]],
                 "threads": torch.get_num_threads()}
    pre = config["pretrain"]
    seed_everything(0)
    batch = synthetic_batch(config, int(pre["batch_size"]), heads)
    out["pretrain_model"] = time_model_steps(
        build_pretrain_model(config["model"]), pretrain_task(config["model"], True), batch,
        pre, engine_cfg, device, steps)
    out["pretrain_strategies"] = time_pretrain_strategies(config, steps, strategies)
    mme = deep_merge(config, {"pretrain": {"target": "mme"}})  # MME's trajectory + HOG target
    out["pretrain_mme_model"] = time_model_steps(
        build_pretrain_model(config["model"], mme_dims=mme_dims(mme)),
        pretrain_task(config["model"], True, mme=pre["mme"]), with_trajectories(batch, mme),
        pre, engine_cfg, device, steps)
    ft = config["finetune"]
    batch = synthetic_batch(config, int(ft["batch_size"]), heads)
    for head in ("mean", "mca"):
        mixer = VideoMixup(ft, heads, token_grid(config["model"]), config["model"]["patch_size"])
        out[f"finetune_{head}_model"] = time_model_steps(
            build_model(config, heads, head), finetune_task(heads, mixer, 0.1), batch, ft,
            engine_cfg, device, steps)
    # The MCA head alone, batched vs a per-clip loop of the same weights (fine-tuning shapes).
    from mofo.models.vit import model_spec

    spec = model_spec(config["model"]["size"], **dict(config["model"].get("dims") or {}))
    out["mca_head"] = time_mca_head(
        int(ft["batch_size"]), token_grid(config["model"]), spec.embed_dim,
        3 if spec.embed_dim % 3 == 0 else spec.num_heads, repeats=max(steps, 1))
    out["mca_head"].pop("all_s")
    mca_line = mca_head_summary(out["mca_head"])
    root = results_root(config)
    if Path(pattern("manifest", root)).exists() and Path(pattern("boxes", root)).parent.exists():
        for mode, cfg in (("pretrain", pre), ("finetune", ft)):
            try:
                out[f"{mode}_loader"] = time_loader(config, mode, int(cfg["batch_size"]),
                                                    int(cfg["num_workers"]), loader_batches)
            except Exception as exc:  # a missing stage output is reported
                out[f"{mode}_loader"] = {"error": str(exc)}
    else:
        out["loader"] = f"skipped: no {root}/manifest.csv and boxes (run the pipeline first)"
    print(json.dumps(out, indent=1))
    print(mca_line)
    print(format_strategy_table(out["pretrain_strategies"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="training throughput benchmark")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    args = parser.parse_args(argv)
    run_training_benchmark(load_config(args.config), steps=args.steps,
                           strategies=[s for s in args.strategies.split(",") if s])
    return 0


if __name__ == "__main__":
    sys.exit(main())
