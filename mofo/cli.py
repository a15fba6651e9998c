"""The ``mofo`` command: the library's entry points outside Snakemake.

The pipeline itself runs through Snakemake (see README); this command is for the pieces a
person runs by hand: generating the demo data, checking a config, building a manifest, and
the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mofo.config import ConfigError, load_config
from mofo.masking import STRATEGY_NAMES


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configfile",
        action="append",
        default=[],
        metavar="YAML",
        help="overlay merged on top of config/config.yaml (repeatable, later files win)",
    )


def _config(args: argparse.Namespace) -> dict:
    return load_config(args.configfile)


def profile_resources(profile: str) -> dict[str, dict]:
    """``{rule: set-resources}`` of a Snakemake profile, found as Snakemake finds it (a path,
    or a name under ./, ~/.config/snakemake, /etc/xdg/snakemake)."""
    import yaml
    from snakemake.cli import get_profile_dir

    found = get_profile_dir(profile)
    if found is None:
        raise ConfigError(f"Snakemake profile {profile!r} not found (a folder with config.yaml, "
                          f"by path or by name in ~/.config/snakemake; see docs/CLUSTER.md "
                          f"\"Running on a SLURM cluster\")")
    settings = yaml.safe_load(found[1].read_text()) or {}
    return dict(settings.get("set-resources") or {})


def cmd_config(args: argparse.Namespace) -> int:
    """The merged config as JSON on stdout; each training stage's batch plan on stderr, for
    the processes the profile (or --gpus) gives a job."""
    from mofo.recipe.batch import TRAINING_STAGES, describe_plans

    config = _config(args)
    print(json.dumps(config, indent=2, sort_keys=False))
    resources = profile_resources(args.profile) if args.profile else {}
    if args.gpus:
        resources = {stage: {"gpu": args.gpus} for stage in TRAINING_STAGES}
    where = (f"{args.gpus} GPU(s) per job" if args.gpus else
             f"profile {args.profile}" if args.profile else "a local run")
    print(f"# batch plan for {where}:", file=sys.stderr)
    for line in describe_plans(config, resources):
        print(f"#   {line}", file=sys.stderr)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """The published-recipe table (--markdown), or how the merged config deviates from it."""
    from mofo.recipe.published import deviations, markdown, recipe_label

    if args.markdown:
        print(markdown(), end="")
        return 0
    config = _config(args)
    print(f"recipe: {recipe_label(config)}")
    for key, published, ours in deviations(config):
        print(f"  {key}: {ours!r} (published: {published!r})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mofo.data.demo import generate

    config = _config(args)
    clips = generate(config["dataset"]["demo"])
    root = config["dataset"]["demo"]["root"]
    print(f"wrote {len(clips)} demo clips to {root}/videos, {root}/clips.csv, {root}/gt_boxes.csv")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from mofo.data.manifest import build_manifest, write_manifest

    config = _config(args)
    manifest = build_manifest(config)
    write_manifest(manifest, args.out)
    counts = manifest.groupby("split").size().to_dict()
    print(f"wrote {args.out}: {len(manifest)} clips {counts}, {manifest['shard'].nunique()} shards")
    return 0


def cmd_clip(args: argparse.Namespace) -> int:
    from mofo.motion.clip import process_clip
    from mofo.paths import pattern, results_root

    config = _config(args)
    root = results_root(config)
    out = Path(args.out) if args.out else Path(pattern("clip", root, clip=args.clip_id))
    gt = Path(config["dataset"]["demo"]["root"]) / "gt_boxes.csv"
    gt_boxes = gt if config["dataset"]["name"] == "demo" and gt.exists() else None
    manifest = args.manifest or Path(pattern("manifest", root))
    report = process_clip(config, manifest, args.clip_id, out, gt_boxes)
    print(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}/boxes.csv and {out}/{args.clip_id}.png")
    return 0


def cmd_bench_motion(args: argparse.Namespace) -> int:
    from mofo.bench.motion import run_motion_benchmark

    config = _config(args)
    height, width = (int(v) for v in args.size.split(","))
    result = run_motion_benchmark(config, n_clips=args.clips, repeats=args.repeats,
                                  big_size=(height, width), cost_max_pairs=args.cost_pairs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from mofo.bench.train import run_training_benchmark

    config = _config(args)
    strategies = [s for s in args.strategies.split(",") if s]
    result = run_training_benchmark(config, steps=args.steps, strategies=strategies)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_bench_mca(args: argparse.Namespace) -> int:
    import torch

    from mofo.bench.train import mca_head_summary, time_mca_head

    torch.set_num_threads(args.threads)
    grid = tuple(int(v) for v in args.grid.split(","))
    result = time_mca_head(args.batch, grid, args.dim, args.heads, args.box, args.repeats)
    times = result.pop("all_s")
    print(json.dumps(result, indent=1))
    print(mca_head_summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "all_s": times}, indent=2))
    return 0

def cmd_export_hf(args: argparse.Namespace) -> int:
    from mofo.models.build import build_classifier, build_pretrain_model
    from mofo.models.checkpoint import CheckpointError, load_pretrained, read_state_dict
    from mofo.models.hf import HFCheckpointError, export_hf

    config = _config(args)
    try:
        state, source = read_state_dict(args.checkpoint)
        if any(k.startswith("encoder.") for k in state):
            model = build_pretrain_model(config["model"])
        elif "head.weight" in state:
            head = "mca" if any(k.startswith("cross_block.") for k in state) else "mean"
            model = build_classifier(config["model"], int(state["head.weight"].shape[0]), pooling=head)
        else:
            raise CheckpointError(f"{source}: neither a pretraining nor a one-output classifier")
        report = load_pretrained(model, state)
        out = export_hf(model.eval(), args.out)
    except (CheckpointError, HFCheckpointError) as err:
        print(f"mofo export-hf: {err}", file=sys.stderr)
        return 1
    print(f"{args.checkpoint}: {len(report.loaded)} tensors -> {out}/config.json, "
          f"{out}/model.safetensors ({type(model).__name__})")
    return 0

def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from mofo.bench.gpu import BenchRequestError, run_gpu_benchmark

    config = _config(args)
    if args.compile:
        config["engine"]["compile"] = True
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    skip = tuple(p.strip() for p in (args.skip or "").split(",") if p.strip())
    try:
        report = run_gpu_benchmark(config, device=args.device, size=args.size, out=args.out,
                                   steps=args.steps, skip=skip, workers=args.workers,
                                   timeout_s=args.worker_timeout,
                                   time_limit_s=args.time_limit, peak_tflops=args.peak_tflops)
    except BenchRequestError as err:
        print(f"mofo bench gpu: {err}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


def cmd_bench_boxes_real(args: argparse.Namespace) -> int:
    from mofo.bench.realboxes import bench_config, format_table, run_benchmark

    config = bench_config(args.configfile, flow=args.flow)
    only = [c.strip() for c in (args.clips or "").split(",") if c.strip()] or None
    try:
        result = run_benchmark(config, args.videos, args.ground_truth, out=args.out, only=only,
                               invariance=not args.no_invariance, threads=args.threads,
                               log=lambda msg: print(msg, file=sys.stderr))
    except (FileNotFoundError, ValueError) as err:
        print(f"mofo bench boxes-real: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {args.out}/boxes-real.md, boxes-real.json, boxes-real.per_frame.csv, pictures/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mofo",
        description="MOFO motion-focused video pretraining: helpers outside the Snakemake "
        "pipeline. Run the pipeline itself with `snakemake --cores 2` (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the merged, validated configuration as JSON, "
                       "and (on stderr) each training stage's total batch, per-GPU batch, "
                       "accumulation steps and lrs for the GPUs a job gets")
    _add_config_args(p)
    p.add_argument("--profile", help="Snakemake profile (name or path, e.g. slurm) whose "
                   "set-resources give the training jobs' GPUs and nodes")
    p.add_argument("--gpus", type=int, help="GPUs (processes) per training job, over the profile")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("recipe", help="how the merged configuration differs from the "
                       "published paper recipe (config/published.yaml)")
    _add_config_args(p)
    p.add_argument("--markdown", action="store_true",
                   help="print docs/RECIPE.md: the published recipe with sources and the "
                   "deviation overlays")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("demo", help="generate the built-in motion-shapes demo videos and boxes")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("manifest", help="build the clip manifest of the configured dataset")
    _add_config_args(p)
    p.add_argument("--out", default="manifest.csv", help="output CSV (default: %(default)s)")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser(
        "clip",
        help="rerun decode -> flow -> motion map -> boxes -> picture for ONE clip into "
        "<results>/<dataset>/clips/<clip_id>/ (the shard outputs are left alone)",
    )
    _add_config_args(p)
    p.add_argument("clip_id", help="clip id as in manifest.csv")
    p.add_argument("--manifest", help="manifest.csv (default: <results>/<dataset>/manifest.csv)")
    p.add_argument("--out", help="output folder (default: <results>/<dataset>/clips/<clip_id>)")
    p.set_defaults(func=cmd_clip)

    p = sub.add_parser(
        "export-hf",
        help="write a mofo checkpoint (pretrained encoder+decoder, or a mean-head classifier) "
        "as a Hugging Face transformers VideoMAE folder (config.json + model.safetensors)",
    )
    _add_config_args(p)
    p.add_argument("checkpoint", help="checkpoint.pt of the pretrain or finetune stage")
    p.add_argument("out", help="output folder (VideoMAEForPreTraining / ...ForVideoClassification)")
    p.set_defaults(func=cmd_export_hf)

    bench = sub.add_parser("bench", help="benchmarks that print throughput figures")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    p = bench_sub.add_parser(
        "motion",
        help="frames/s per core of decode, each flow method, motion map and boxes, the "
        "token-grid IoU of the faster flow options against full-resolution TV-L1, and the "
        "robust mode's cost per frame pair next to half-size TV-L1",
    )
    _add_config_args(p)
    p.add_argument("--clips", type=int, default=4, help="demo clips to measure (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per figure; medians are printed")
    p.add_argument("--size", default="224,298",
                   help="height,width of the larger clips, also used for the robust mode's "
                   "cost (default: %(default)s)")
    p.add_argument("--cost-pairs", type=int, default=11,
                   help="flow pairs per clip for the robust mode's cost (default: %(default)s)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_motion)

    p = bench_sub.add_parser(
        "train",
        help="clips/s and peak memory of pretraining and fine-tuning steps, tokens per clip "
        "(encoder, decoder) and step time of pretraining with each masking strategy side by "
        "side, and the data loader's clip rate, on the CPU (and the GPU when there is one)",
    )
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per figure (default: %(default)s)")
    p.add_argument("--strategies", default=",".join(STRATEGY_NAMES),
                   help="masking strategies timed side by side (default: %(default)s)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_train)

    p = bench_sub.add_parser(
        "mca",
        help="the MCA head alone: forward+backward of the batched head and of a per-clip "
        "loop with the same weights, timed alternately (default: ViT-B shapes, one thread)",
    )
    p.add_argument("--batch", type=int, default=16, help="clips (default: %(default)s)")
    p.add_argument("--grid", default="8,14,14",
                   help="token grid t,h,w (default: %(default)s = 16x224x224, 2x16x16 tubelets)")
    p.add_argument("--dim", type=int, default=768, help="token width (default: %(default)s)")
    p.add_argument("--heads", type=int, default=3, help="attention heads (default: %(default)s)")
    p.add_argument("--box", type=float, default=0.25,
                   help="fraction of each frame's tokens in the box (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_mca)

    p = bench_sub.add_parser(
        "gpu",
        help="the GPU half in one run: ViT-B pretraining (tube, mofo) and fine-tuning (mean, "
        "mca) steps in bf16 and fp32, a torchrun DDP and a DeepSpeed step, evaluation, the "
        "loader, the SDPA kernel, and correctness checks; on the CPU the same at tiny size, "
        "naming the GPU-only parts it skipped. Exit 1 when a check fails or a part errors",
    )
    _add_config_args(p)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: the GPU when one is visible (default: %(default)s)")
    p.add_argument("--size", choices=["tiny", "base"],
                   help="model/input preset (default: base on a GPU, tiny on the CPU)")
    p.add_argument("--out", default="results/bench-gpu",
                   help="folder for bench-gpu.md / .json and the workers' logs (default: %(default)s)")
    p.add_argument("--steps", type=int, help="timed steps per row (default: the preset's)")
    p.add_argument("--skip", help="comma-separated parts to leave out: checks, train, sdpa, "
                   "eval, loader, ddp, deepspeed (each is named under 'Skipped')")
    p.add_argument("--workers", type=int,
                   help="loader workers (default: the config's <stage>.num_workers)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the timed models (engine.compile_backend); the note gives "
                        "each row's first step: the compile time")
    p.add_argument("--peak-tflops",
                   help="the device's dense peak TFLOP/s for the utilisation column: N (every "
                        "precision) or bf16=N,fp32=M (default: the table in mofo/bench/flops.py "
                        "for known GPUs; none on a CPU)")
    p.add_argument("--worker-timeout", type=int, default=600,
                   help="seconds allowed to each DDP / DeepSpeed worker (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=450,
                   help="seconds after which parts not yet started are reported as not run, "
                   "so the table prints before a `timeout 480` (default: %(default)s)")
    p.set_defaults(func=cmd_bench_gpu)

    p = bench_sub.add_parser(
        "boxes-real",
        help="motion boxes on real footage (benchmarks/real_boxes: public clips, boxes drawn "
        "by hand): IoU per clip for ours / raw flow / centre box, box areas, fallback shares, "
        "and the invariance of the boxes to a known pan / zoom / shake of a window",
    )
    p.add_argument(
        "--configfile", action="append", default=[], metavar="YAML",
        help="overlay merged over config/config.yaml + config/list.yaml (the real-data "
        "defaults: TV-L1 at scale 0.5, short side 256); repeatable, later files win",
    )
    p.add_argument("--videos", default="data/real",
                   help="folder with the videos (tools/fetch_real_clips.sh; default: %(default)s)")
    p.add_argument("--ground-truth", default="benchmarks/real_boxes",
                   help="folder with clips.csv and the hand-drawn keyframes.csv (default: %(default)s)")
    p.add_argument("--out", default="results/bench-boxes-real",
                   help="folder for boxes-real.md / .json, per-frame CSV, pictures (default: %(default)s)")
    p.add_argument("--flow", choices=["tvl1", "dis", "farneback"],
                   help="override optical_flow.method only (dis: a quick run; scale stays)")
    p.add_argument("--clips", help="comma-separated clip names (default: all of clips.csv)")
    p.add_argument("--no-invariance", action="store_true", help="skip the pan/zoom/shake test")
    p.add_argument("--threads", type=int, default=1,
                   help="OpenCV threads (default: %(default)s, per-core timings)")
    p.set_defaults(func=cmd_bench_boxes_real)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"mofo: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
