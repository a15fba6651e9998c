"""Stage entry point: VideoMAE / MOFO masked-autoencoder pretraining.

``run(config, manifest_path, results_dir, masking, out_dir)`` trains on the manifest's train
split. ``masking`` is the pretraining name (``mofo.provenance.pretraining_spec``): a masking
strategy (``tube``, ``mofo``, ``mgmae`` or ``everest``, the last selected inside the training
step from the patch embeddings: VideoMAE's pixel target) or ``<strategy>_mme`` (MME's target:
point trajectories and HOG, with that strategy's masks). It writes into ``out_dir``:
``checkpoint-last.pt`` (resumable), ``checkpoint.pt`` (final weights, VideoMAE layout, with
``meta``), ``metrics.jsonl`` and (pixel targets) ``reconstructions/*.png``. As a module it runs the same under
one process, ``torchrun`` or DeepSpeed::

    python -m mofo.training.pretrain --config config/my.yaml --masking mofo --out results/x
    torchrun --standalone --nproc-per-node=2 -m mofo.training.pretrain --masking tube --out ...
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mofo.config import deep_merge, load_config
from mofo.masking import STRATEGY_NAMES, is_model_side, select_from_config
from mofo.models.build import build_pretrain_model
from mofo.models.hog import hog_dim
from mofo.paths import RECONSTRUCTIONS, VALIDATION
from mofo.provenance import inputs_digest, pretrain_stage, pretraining_spec, stage_settings
from mofo.recipe.batch import planned_stage
from mofo.runtime import data as data_io
from mofo.runtime.device import device_frames, seed_everything
from mofo.runtime.distributed import cleanup_distributed, init_distributed, unwrap
from mofo.stage_args import resolve_paths, stage_arg_parser
from mofo.training.engine import TrainResult, train
from mofo.training.losses import masked_reconstruction_loss, mme_loss
from mofo.training.metrics_log import MetricsCallback


def pretrain_masks(model: torch.nn.Module, batch: dict,
                   masking_cfg: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, target)`` bool ``(B, N)`` of one batch: hidden from the encoder, and
    reconstructed. A loader-side strategy: both are the batch's ``mask``. A model-side one
    (``masking_cfg`` names it, e.g. everest): selected now from the model's patch embeddings
    (no gradient; the forward pass embeds the clips again, one Conv3d), hidden minus target
    being the dropped tokens. ``model`` may be wrapped (DDP / DeepSpeed)."""
    if masking_cfg is not None and is_model_side(masking_cfg["strategy"]):
        inner = unwrap(model)
        with torch.no_grad():
            embeddings = inner.encoder.embed(batch["frames"])
        return select_from_config(masking_cfg, embeddings, inner.grid)
    if "mask" not in batch:
        raise ValueError("the batch has no 'mask' and no model-side masking strategy is set")
    mask = batch["mask"].bool()
    return mask, mask


def pretrain_task(model_cfg: dict, normalize_target: bool, masking_cfg: dict | None = None,
                  mme: dict | None = None) -> Callable:
    """``task(model, batch) -> (loss, extras)``: MSE on per-patch targets over the
    reconstructed tokens only (:func:`pretrain_masks`; dropped tokens are not in the loss).
    ``masking_cfg``: the ``masking`` section, needed for a model-side strategy (None: the
    batch's loader mask). Given ``mme`` (the ``pretrain.mme`` section), MME's loss over the
    same tokens instead (:func:`mofo.training.losses.mme_loss`; extras: its two parts; the
    batch carries ``trajectories`` and ``trajectory_valid``)."""
    patch, tubelet = int(model_cfg["patch_size"]), int(model_cfg["tubelet_size"])

    def task(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        hidden, target = pretrain_masks(model, batch, masking_cfg)
        pred = model(batch["frames"], hidden, target)
        if mme is not None:
            return mme_loss(pred, batch["frames"], target, batch["trajectories"],
                            batch["trajectory_valid"], patch, tubelet, int(mme["cell"]),
                            int(mme["orientations"]))
        loss = masked_reconstruction_loss(pred, batch["frames"], target, patch, tubelet,
                                          normalize_target)
        return loss, {}

    return task


def mme_dims(config: dict) -> tuple[int, int] | None:
    """``(trajectory, HOG)`` output widths of MME's decoder heads, None for pixel targets."""
    if config["pretrain"]["target"] != "mme":
        return None
    cell, patch = int(config["pretrain"]["mme"]["cell"]), int(config["model"]["patch_size"])
    if patch % cell:
        raise ValueError(f"pretrain.mme.cell {cell} must divide model.patch_size {patch}")
    points = (patch // cell) ** 2
    return (points * int(config["trajectories"]["steps"]) * 2,
            hog_dim(patch, cell, int(config["pretrain"]["mme"]["orientations"])))


def stage_config(config: dict, masking: str, seed: int | None = None) -> dict:
    """The config this pretraining runs with: ``masking.strategy`` and ``pretrain.target``
    from the pretraining name ``masking`` (``tube``, ``mofo_mme``, ...) and ``pretrain.seed``
    from ``seed`` (the rule's ``{seed}`` wildcard; None = the first of ``seeds``). The seed
    is not a config-file key: the ``seeds`` list is its one home."""
    strategy, target = pretraining_spec(masking)
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"pretraining {masking!r}: unknown masking strategy {strategy!r}; "
                         f"choose one of {sorted(STRATEGY_NAMES)}")
    seed = int(config["seeds"][0] if seed is None else seed)
    return deep_merge(config, {"masking": {"strategy": strategy},
                               "pretrain": {"target": target, "seed": seed}})


def provenance(config: dict, manifest_path: str | Path, results_dir: str | Path) -> dict:
    """What makes two pretrainings the same run: the settings pretraining reads (declared in
    ``mofo.provenance.STAGE_READS``, per target and masking), the masking strategy, the target
    and digests of the input files (with the trajectory files for MME's target, the pooled
    flow for a strategy that follows the flow)."""
    target, masking = config["pretrain"]["target"], config["masking"]["strategy"]
    files = data_io.input_files(manifest_path, results_dir,
                                **data_io.pretraining_reads(masking, target))
    spec = {"stage": "pretrain", "masking": masking,
            "settings": stage_settings(config, pretrain_stage(target), masking),
            "inputs": inputs_digest(files)}
    # pixel runs keep the provenance they had before targets existed (their resume state holds)
    return spec if target == "pixels" else {**spec, "target": target}


def run(config: dict, manifest_path: str | Path, results_dir: str | Path, masking: str,
        out_dir: str | Path, metrics_callback: MetricsCallback | None = None,
        max_steps: int | None = None, seed: int | None = None) -> Path:
    """Pretrain and return the path of the final checkpoint (``out_dir/checkpoint.pt``).
    ``seed``: see :func:`stage_config`."""
    config = stage_config(config, masking, seed)
    engine_cfg = config["engine"]
    out_dir = Path(out_dir)
    ctx = init_distributed(engine_cfg)
    try:
        pre_cfg, plan = planned_stage(config["pretrain"], ctx.world_size, f"pretrain-{masking}",
                                      ctx.is_main)
        loader = data_io.build_train_loader(config, manifest_path, results_dir, "pretrain", pre_cfg,
                                            ctx.world_size)
        seed_everything(int(pre_cfg["seed"]))  # same initial weights on every rank and run
        model = build_pretrain_model(config["model"], drop_path=float(pre_cfg["drop_path"]),
                                     mme_dims=mme_dims(config))
        meta = {"stage": "pretrain", "masking": masking, "target": pre_cfg["target"],
                "dataset": config["dataset"]["name"], "model_size": config["model"]["size"],
                "batch": plan.as_dict()}
        task = pretrain_task(config["model"], pre_cfg["normalize_target"], config["masking"],
                             pre_cfg["mme"] if pre_cfg["target"] == "mme" else None)
        result = train(model, loader, task,
                       stage_cfg=pre_cfg, engine_cfg=engine_cfg, ctx=ctx, out_dir=out_dir,
                       hash_config=provenance(config, manifest_path, results_dir), meta=meta,
                       metrics_callback=metrics_callback, max_steps=max_steps,
                       stage=f"pretrain-{masking}")
        if ctx.is_main and result.status == "finished":
            if pre_cfg["target"] == "pixels":  # a non-pixel target has no pixels to draw
                save_reconstructions(unwrap(model), loader.dataset, config,
                                     out_dir / RECONSTRUCTIONS,
                                     int(pre_cfg["n_reconstruction_clips"]), ctx.device)
            write_validation(unwrap(model), config, manifest_path, results_dir, out_dir, ctx.device)
        return _final_path(result)
    finally:
        cleanup_distributed()


def write_validation(model: torch.nn.Module, config: dict, manifest_path: str | Path,
                     results_dir: str | Path, out_dir: Path, device: torch.device) -> Path:
    """``out_dir/validation.json``: held-out reconstruction vs the predict-the-mean floor
    (:func:`mofo.training.validation.validation_reconstruction`); without a validation split
    the numbers are null and ``reason`` says why, as for a non-pixel target (MME's)."""
    from mofo.training.validation import validation_reconstruction

    manifest = data_io.read_manifest(manifest_path)
    target = config["pretrain"]["target"]
    if target != "pixels":
        result = {"ratio": None, "split": None,
                  "reason": f"target {target}: no pixel reconstruction to score"}
    elif (manifest["split"] == "validation").any():
        result = validation_reconstruction(model, config, manifest_path, results_dir, device)
    else:
        result = {"ratio": None, "split": None, "reason": "the manifest has no validation split"}
    path = out_dir / VALIDATION
    tmp = path.with_name(f".{VALIDATION}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path


def _final_path(result: TrainResult) -> Path:
    return result.final_checkpoint if result.final_checkpoint is not None else result.last_checkpoint


@torch.no_grad()
def save_reconstructions(model: torch.nn.Module, dataset, config: dict, out_dir: Path,
                         n_clips: int, device: torch.device) -> list[Path]:
    """Original / masked / reconstructed frames (motion box drawn) of the first clips;
    tokens a model-side strategy dropped are drawn black."""
    from mofo.viz.figures import reconstruction_figure

    model.eval()
    paths = []
    model_cfg = config["model"]
    for i in range(min(n_clips, len(dataset))):
        item = dataset[i]
        frames = device_frames(item["frames"][None], device)
        batch = {"frames": frames, **({"mask": item["mask"][None]} if "mask" in item else {})}
        hidden, target = (m.to(device) for m in pretrain_masks(model, batch, config["masking"]))
        pred = model(frames, hidden, target)[0]
        boxes = item.get("boxes")
        boxes = boxes.numpy() if isinstance(boxes, torch.Tensor) else boxes
        paths.append(reconstruction_figure(
            frames[0].cpu(), target[0], pred, boxes, out_dir / f"{item['clip_id']}.png",
            int(model_cfg["patch_size"]), int(model_cfg["tubelet_size"]),
            bool(config["pretrain"]["normalize_target"]),
            title=f"{item['clip_id']} ({config['masking']['strategy']} masking)",
            dropped=(hidden & ~target)[0]))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = stage_arg_parser("MOFO / VideoMAE pretraining")
    parser.add_argument("--masking", required=True,
                        help="pretraining name: <strategy> (pixels; one of "
                             f"{sorted(STRATEGY_NAMES)}) or <strategy>_mme, e.g. tube_mme")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the init, loader order, augmentations and masks "
                             "(default: the first of the config's seeds)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop (with a checkpoint) after this many steps")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    manifest, results_dir = resolve_paths(config, args)
    path = run(config, manifest, results_dir, args.masking, args.out, max_steps=args.max_steps,
               seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
