"""Stage entry point: supervised fine-tuning with the mean-pooling or MCA head.

``run(config, manifest_path, results_dir, pretrained_ckpt, head, out_dir)`` loads a
pretrained checkpoint (ours or an official VideoMAE/MOFO file; ``None`` trains from
scratch), fine-tunes on the train split with layer-wise lr decay, mixup/cutmix + label
smoothing (``mofo.training.mixup``), drop path, and the dataset's RandAugment / random
erasing, and writes ``checkpoint-last.pt``, ``checkpoint.pt``, ``metrics.jsonl`` and
``load_report.json`` into ``out_dir``. EPIC-KITCHENS-100 gets a verb and a noun output, the
loss their sum, mixed with the same partner and lam (``dataset.epic100.classifier:
verb_noun``), or the MOFO authors' one ``action`` output over the train split's (verb, noun)
pairs (``action``; the pairs are the checkpoint's ``meta["actions"]``).

Which weights ``checkpoint.pt`` holds is ``finetune.selection`` (``mofo.training.selection``):
the last epoch's (``last``), or -- the MOFO code's protocol -- the epoch with the best top-1
on ``evaluate.split``, validated after every epoch, with early stopping on the validation
loss after ``finetune.patience`` epochs without improvement (``best``); ``meta["selection"]``
records the rule, the epoch kept and the epochs run.

With ``finetune.label_fraction`` below 1 (a variant's ``label_fraction``: the ``label_fraction``
argument) only that share of the train split's labelled clips is used, stratified by class
and drawn from the seed (``mofo.data.manifest.label_subset``); ``out_dir/label_subset.csv``
lists them (clip_id, label) and ``meta["label_subset"]`` counts them.

    python -m mofo.training.finetune --pretrained results/demo/pretrain/mofo/checkpoint.pt \
        --head mca --out results/demo/finetune/mofo_mca
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mofo.config import deep_merge, load_config
from mofo.data.manifest import label_subset
from mofo.masking.grid import token_grid
from mofo.models.build import build_model
from mofo.models.checkpoint import pretrained_meta
from mofo.paths import LABEL_SUBSET
from mofo.provenance import inputs_digest, stage_settings
from mofo.recipe.batch import planned_stage
from mofo.runtime import data as data_io
from mofo.runtime.device import seed_everything
from mofo.runtime.distributed import cleanup_distributed, init_distributed
from mofo.stage_args import resolve_paths, stage_arg_parser
from mofo.training.engine import train
from mofo.training.losses import classification_loss
from mofo.training.metrics_log import MetricsCallback
from mofo.training.mixup import VideoMixup
from mofo.training.selection import last_selection_meta, selection_hook

HEADS = ("mean", "mca")


def action_lookup(actions: Sequence[Sequence[int]]) -> torch.Tensor:
    """int64 ``(97, 300)``: the action index of each (verb, noun) pair of ``actions`` (the
    vocabulary, ``mofo.runtime.data.action_vocabulary``), -1 for pairs outside it."""
    shape = (data_io.EPIC_HEADS["verb"], data_io.EPIC_HEADS["noun"])
    lookup = torch.full(shape, -1, dtype=torch.int64)
    for index, (verb, noun) in enumerate(actions):
        lookup[int(verb), int(noun)] = index
    return lookup


def action_targets(lookup: torch.Tensor, batch: dict) -> torch.Tensor:
    """The batch's action classes from its ``verb`` / ``noun`` targets; a clip whose pair is
    not in the vocabulary is an error (the vocabulary holds every train pair)."""
    verb, noun = batch["verb"], batch["noun"]
    target = lookup.to(verb.device)[verb, noun]
    if bool((target < 0).any()):
        bad = torch.nonzero(target < 0)[0, 0]
        clip = batch["clip_id"][bad] if "clip_id" in batch else f"#{int(bad)} of the batch"
        raise ValueError(f"dataset.epic100.classifier 'action': clip {clip} has "
                         f"(verb, noun) = ({int(verb[bad])}, {int(noun[bad])}), not an action "
                         "class of the manifest's train split")
    return target


def finetune_task(heads: dict[str, int], mixer: VideoMixup | None, label_smoothing: float,
                  actions: Sequence[Sequence[int]] | None = None) -> Callable:
    """``task(model, batch) -> (loss, extras)``: (mixed) cross-entropy summed over heads.
    An ``action`` head (EPIC-KITCHENS-100's ``action`` classifier) needs ``actions``, the
    vocabulary its targets are looked up in (from the batch's ``verb`` and ``noun``)."""
    if ("action" in heads) != (actions is not None):
        raise ValueError(f"heads {sorted(heads)}: an 'action' head needs the action vocabulary "
                         "and only it takes one")
    lookup = action_lookup(actions) if actions is not None else None

    def task(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        targets = {name: batch[name] for name in heads if name != "action"}
        if lookup is not None:
            targets["action"] = action_targets(lookup, batch)
        frames, inbox = batch["frames"], batch.get("inbox")
        inbox = inbox.bool() if inbox is not None else None
        if mixer is not None:
            frames, inbox, targets = mixer(frames, inbox, targets)
        out = model(frames, inbox)
        if not isinstance(out, dict):
            out = {next(iter(heads)): out}
        loss = sum(classification_loss(out[name], targets[name], label_smoothing)
                   for name in heads)
        return loss, {}

    return task


def provenance(config: dict, head: str, manifest_path: str | Path, results_dir: str | Path,
               pretrained_ckpt: str | Path | None) -> dict:
    """What makes two fine-tunings the same run: the settings fine-tuning reads (declared in
    ``mofo.provenance.STAGE_READS``), the head, and digests of the inputs -- the pretrained
    checkpoint's content included, not only its path."""
    files = {**data_io.input_files(manifest_path, results_dir), "pretrained": pretrained_ckpt}
    return {"stage": "finetune", "head": head, "settings": stage_settings(config, "finetune"),
            "inputs": inputs_digest(files)}


def labelled_share(ft: dict, manifest, out_dir: Path, is_main: bool) -> list[str] | None:
    """The train clips fine-tuning may use: None for every one (``label_fraction`` 1), else the
    seed's stratified share (module doc), written to ``out_dir/label_subset.csv`` by the main
    process. Too few clips for one optimizer step is an error naming the numbers."""
    fraction = float(ft["label_fraction"])
    if fraction == 1.0:
        return None
    subset = label_subset(manifest, fraction, int(ft["seed"]))
    if len(subset) < int(ft["total_batch"]):
        raise ValueError(f"finetune.label_fraction {fraction}: {len(subset)} labelled train clips, "
                         f"fewer than one step's finetune.total_batch {ft['total_batch']}")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{LABEL_SUBSET}.tmp"
        subset[["clip_id", "label"]].to_csv(tmp, index=False)
        tmp.replace(out_dir / LABEL_SUBSET)
    return subset["clip_id"].tolist()


def run(config: dict, manifest_path: str | Path, results_dir: str | Path,
        pretrained_ckpt: str | Path | None, head: str, out_dir: str | Path,
        metrics_callback: MetricsCallback | None = None, max_steps: int | None = None,
        seed: int | None = None, label_fraction: float | None = None) -> Path:
    """Fine-tune and return the path of the final checkpoint (``out_dir/checkpoint.pt``).
    ``seed`` (the rule's ``{seed}`` wildcard; None = the first of ``seeds``) decides the head
    init, mixup draws, the loader order and the label share; it becomes ``finetune.seed`` of the
    stage config (not a config-file key: the ``seeds`` list is its one home).
    ``label_fraction`` (a variant's, from the ``{head}`` wildcard; None = the config's) becomes
    ``finetune.label_fraction``, so it is in the run's provenance."""
    if head not in HEADS:
        raise ValueError(f"fine-tuning head must be one of {HEADS}, got {head!r}")
    seed = int(config["seeds"][0] if seed is None else seed)
    share = {} if label_fraction is None else {"label_fraction": float(label_fraction)}
    config = deep_merge(config, {"finetune": {"seed": seed, **share}})
    engine_cfg = config["engine"]
    out_dir = Path(out_dir)
    ctx = init_distributed(engine_cfg)
    try:
        ft, plan = planned_stage(config["finetune"], ctx.world_size, f"finetune-{head}",
                                 ctx.is_main)
        manifest = data_io.read_manifest(manifest_path)
        heads = data_io.output_heads(config, manifest)
        actions = data_io.epic_actions(config, manifest)  # None unless EPIC's action classifier
        clip_ids = labelled_share(ft, manifest, out_dir, ctx.is_main)
        loader = data_io.build_train_loader(config, manifest_path, results_dir, "finetune", ft,
                                            ctx.world_size, clip_ids)
        seed_everything(int(ft["seed"]))  # same head init on every rank and run
        model = build_model(config, heads, head)
        report = None
        if pretrained_ckpt:
            from mofo.models.checkpoint import load_pretrained

            report = load_pretrained(model, pretrained_ckpt)
            if ctx.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "load_report.json").write_text(
                    json.dumps(report.to_dict(), indent=1, default=str))
        src_meta = pretrained_meta(pretrained_ckpt)
        meta = {"stage": "finetune", "finetune_head": head, "heads": heads,
                "pretrain_masking": src_meta.get("masking",
                                                 "external" if pretrained_ckpt else "none"),
                "pretrained": str(pretrained_ckpt or ""), "dataset": config["dataset"]["name"],
                "model_size": config["model"]["size"], "batch": plan.as_dict(),
                "label_fraction": float(ft["label_fraction"]),
                "label_subset": len(loader.dataset) if clip_ids is not None else None}
        if actions is not None:  # action index -> [verb_class, noun_class], for evaluation
            meta["actions"] = [list(pair) for pair in actions]
        mixer = VideoMixup(ft, heads, token_grid(config["model"]),
                           int(config["model"]["patch_size"]))
        task = finetune_task(heads, mixer if mixer.enabled else None,
                             float(ft["label_smoothing"]), actions)
        hook = selection_hook(config, manifest_path, results_dir, list(heads), ctx,
                              None if actions is None else action_lookup(actions))
        meta["selection"] = last_selection_meta(ft) if hook is None else {"rule": "best"}
        result = train(model, loader, task, stage_cfg=ft, engine_cfg=engine_cfg, ctx=ctx,
                       out_dir=out_dir,
                       hash_config=provenance(config, head, manifest_path, results_dir,
                                              pretrained_ckpt),
                       meta=meta, metrics_callback=metrics_callback, max_steps=max_steps,
                       stage=f"finetune-{head}", epoch_end=hook)
        return result.final_checkpoint or result.last_checkpoint
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> int:
    parser = stage_arg_parser("fine-tuning (mean or MCA head)")
    parser.add_argument("--pretrained", default=None,
                        help="pretrained checkpoint (ours or official); omit to train from scratch")
    parser.add_argument("--head", required=True, choices=list(HEADS))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--label-fraction", type=float, default=None,
                        help="fine-tune on this share of the train split's labels, stratified "
                             "by class (default: the config's finetune.label_fraction)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the head init, mixup and loader order (default: the first "
                             "of the config's seeds)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    manifest, results_dir = resolve_paths(config, args)
    print(run(config, manifest, results_dir, args.pretrained, args.head, args.out,
              max_steps=args.max_steps, seed=args.seed, label_fraction=args.label_fraction))
    return 0


if __name__ == "__main__":
    sys.exit(main())
