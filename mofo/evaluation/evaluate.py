"""Stage entry point: multi-view testing of a fine-tuned checkpoint.

Every clip of ``evaluate.split`` is seen as ``augment.test_clips`` temporal views x
``augment.test_crops`` spatial crops; the views' softmax probabilities (or logits,
``evaluate.average``) are averaged per clip. ``run(...)`` writes into ``out_dir``:

- ``metrics.json``: top-k, mean per-class accuracy, per-class accuracy, counts, the variant
  (``pretrain_masking``, ``finetune_head``); EPIC-KITCHENS-100: ``verb_*``, ``noun_*`` and
  ``action_*`` (verb and noun both right), with ``top1``/``top5`` = the action accuracies.
  A checkpoint with one ``action`` output (``dataset.epic100.classifier: action``) is scored
  on its own vocabulary (``meta["actions"]``): verb and noun scores are the marginals of the
  action probabilities (``metrics.marginalize_actions``), the action is the action class's
  (a pair outside the vocabulary counts as wrong; ``n_unseen_actions`` counts them);
- ``predictions.csv``: one row per clip (label, prediction, top-5, probability, views); EPIC:
  ``verb_*``, ``noun_*`` and ``action_correct``, and for the ``action`` output also
  ``action_label`` / ``action_pred`` / ``action_top5`` (vocabulary indices; ``action_label``
  -1 with ``action_correct`` 0: the pair is not in the vocabulary);
- ``confusion.png`` (and ``confusion_noun.png`` for EPIC) -- row-normalised.

Runs in one process (GPU when visible); ``python -m mofo.evaluation.evaluate`` is the CLI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mofo.config import load_config
from mofo.evaluation.metrics import (
    action_labels,
    action_metrics,
    aggregate_views,
    classification_metrics,
    marginalize_actions,
    vocabulary_action_metrics,
)
from mofo.evaluation.table import variant_name
from mofo.models.build import build_model
from mofo.models.checkpoint import load_pretrained
from mofo.paths import CONFUSION, METRICS, PREDICTIONS
from mofo.runtime import data as data_io
from mofo.runtime.device import autocast_context, to_device
from mofo.runtime.distributed import apply_cpu_threads, rank_info, select_device
from mofo.stage_args import resolve_paths, stage_arg_parser
from mofo.viz.figures import confusion_figure


class EvaluationError(RuntimeError):
    """The checkpoint does not fit the requested evaluation; the message names the file."""


def load_finetuned(config: dict, ckpt_path: str | Path, head: str,
                   heads: dict[str, int]) -> tuple[torch.nn.Module, dict]:
    """The classifier with the checkpoint's weights, and the checkpoint's ``meta``.

    Our checkpoints load strictly. Official fine-tuned files (no ``meta``) go through
    ``load_pretrained``, and must not leave any head weight at its initialisation.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise FileNotFoundError(f"fine-tuned checkpoint not found: {ckpt_path}")
    import argparse

    # VideoMAE's files also pickle the run's argparse Namespace; allow that class only.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    meta = dict(obj.get("meta") or {}) if isinstance(obj, dict) else {}
    if meta.get("finetune_head") not in (None, head):
        raise EvaluationError(f"{ckpt_path} was fine-tuned with head "
                              f"{meta['finetune_head']!r}, asked to evaluate {head!r}")
    heads = {k: int(v) for k, v in (meta.get("heads") or heads).items()}
    model = build_model(config, heads, head)
    if meta:
        missing, unexpected = model.load_state_dict(obj["model"], strict=False)
        if missing or unexpected:
            raise EvaluationError(f"{ckpt_path}: weights do not fit the {head} classifier: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    else:
        report = load_pretrained(model, obj)
        if report.initialised or report.reinitialised_head or report.missing:
            raise EvaluationError(
                f"{ckpt_path} is not a fine-tuned checkpoint for this model: "
                f"{report.summary()}")
    meta.setdefault("heads", heads)
    return model, meta


@torch.no_grad()
def predict_views(model: torch.nn.Module, loader, device: torch.device, engine_cfg: dict,
                  head_names: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Logits of every test view: clip ids (one per view) and ``{head: (views, C)}``."""
    model.eval().to(device)
    clip_ids: list[str] = []
    logits: dict[str, list[np.ndarray]] = {name: [] for name in head_names}
    for batch in tqdm(loader, desc="evaluate", file=sys.stderr, leave=False):
        batch = to_device(batch, device)
        with autocast_context(engine_cfg, device):
            out = model(batch["frames"], batch["inbox"].bool())
        if not isinstance(out, dict):
            out = {head_names[0]: out}
        for name in head_names:
            logits[name].append(out[name].float().cpu().numpy())
        clip_ids.extend(batch["clip_id"])
    return clip_ids, {k: np.concatenate(v) for k, v in logits.items()}


def clip_labels(dataset, clip_order: list[str], column: str) -> np.ndarray:
    """Labels in ``clip_order`` from the dataset's clip table (``label`` / ``verb_class`` ...)."""
    table = dataset.clips.set_index("clip_id")[column]
    return table.loc[clip_order].to_numpy(np.int64)


def predictions_table(clip_order: list[str], probs: np.ndarray, labels: np.ndarray,
                      n_views: np.ndarray, prefix: str = "") -> pd.DataFrame:
    """Per-clip predictions: label, prediction, its score, top-5 and correctness."""
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    pred = top5[:, 0]
    return pd.DataFrame({
        "clip_id": clip_order,
        f"{prefix}label": labels,
        f"{prefix}pred": pred,
        f"{prefix}score": probs[np.arange(len(pred)), pred],
        f"{prefix}top5": [" ".join(map(str, row)) for row in top5],
        f"{prefix}correct": np.where(labels >= 0, (pred == labels).astype(int), -1),
        "n_views": n_views,
    })


LABEL_COLUMNS = {"label": "label", "verb": "verb_class", "noun": "noun_class"}


def clip_scores(view_ids: list[str], logits: dict[str, np.ndarray], average: str
                ) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """The views averaged per clip (``aggregate_views``, ``evaluate.average``): clip ids,
    ``{head: averaged scores}``, ``{head: probabilities}`` (the scores themselves when
    probabilities were averaged, else their softmax) and the views per clip."""
    scores: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray] = {}
    clip_order: list[str] = []
    n_views = np.zeros(0, dtype=np.int64)
    for name, view_logits in logits.items():
        clip_order, scores[name], n_views = aggregate_views(view_ids, view_logits, average)
        probs[name] = scores[name] if average == "softmax" else \
            torch.softmax(torch.from_numpy(scores[name]), 1).numpy()
    return clip_order, scores, probs, n_views


def checkpoint_actions(meta: dict, ckpt_path: str | Path) -> list[tuple[int, int]]:
    """The action vocabulary an ``action`` head was trained on (``meta["actions"]``: action
    index -> (verb_class, noun_class)); an error naming the file when it is missing or does
    not match the head's size."""
    actions = meta.get("actions")
    size = int(meta["heads"]["action"])
    if not actions or len(actions) != size:
        raise EvaluationError(
            f"{ckpt_path}: its 'action' head has {size} classes but meta['actions'] holds "
            f"{len(actions or [])} (verb, noun) pairs; the action vocabulary of "
            "dataset.epic100.classifier 'action' is written by mofo's fine-tuning")
    return [(int(verb), int(noun)) for verb, noun in actions]


def scored_outputs(heads: dict[str, int], meta: dict, ckpt_path: str | Path,
                   scores: dict[str, np.ndarray], probs: dict[str, np.ndarray]
                   ) -> tuple[dict[str, int], list[tuple[int, int]] | None]:
    """The outputs that get per-class metrics (name -> class count) and the action vocabulary
    (None without an ``action`` head). The heads themselves, except for an ``action`` head:
    then EPIC's verb and noun, whose scores and probabilities, the marginals of the action
    probabilities, are added to ``scores`` / ``probs`` here."""
    if "action" not in heads:
        return dict(heads), None
    actions = checkpoint_actions(meta, ckpt_path)
    outputs = dict(data_io.EPIC_HEADS)
    probs["verb"], probs["noun"] = marginalize_actions(probs["action"], actions,
                                                       outputs["verb"], outputs["noun"])
    scores["verb"], scores["noun"] = probs["verb"], probs["noun"]
    return outputs, actions


def epic_action_results(probs: dict[str, np.ndarray], verb: np.ndarray, noun: np.ndarray,
                        actions: list[tuple[int, int]] | None, ks: list[int],
                        predictions: pd.DataFrame) -> dict:
    """EPIC-KITCHENS-100 action metrics (``action_top{k}`` and ``top{k}`` = the same, the
    table's columns) and the ``action_*`` columns of ``predictions`` (added in place).
    ``actions`` None: the two heads' action = verb and noun both right
    (``metrics.action_metrics``); else the ``action`` head's probabilities ranked against
    the clip's pair in the vocabulary (``metrics.vocabulary_action_metrics``)."""
    if actions is None:
        res = action_metrics(probs["verb"], probs["noun"], verb, noun, ks)
        ok = (predictions["verb_correct"] == 1) & (predictions["noun_correct"] == 1)
        predictions["action_correct"] = np.where(predictions["verb_correct"] < 0, -1,
                                                 ok.astype(int))
    else:
        res = vocabulary_action_metrics(probs["action"], verb, noun, actions, ks)
        res["n_actions"] = len(actions)
        labels = action_labels(verb, noun, actions)
        table = predictions_table(list(predictions["clip_id"]), probs["action"], labels,
                                  predictions["n_views"].to_numpy(), "action_")
        table["action_label"] = np.where(labels == len(actions), -1, labels)
        for column in ("label", "pred", "score", "top5", "correct"):
            predictions[f"action_{column}"] = table[f"action_{column}"].to_numpy()
    for k in ks:  # the table's top-k columns are the action accuracies for EPIC
        res[f"top{k}"] = res[f"action_top{k}"]
    return res


def run(config: dict, manifest_path: str | Path, results_dir: str | Path,
        finetuned_ckpt: str | Path, head: str, out_dir: str | Path) -> dict:
    """Test ``finetuned_ckpt`` on ``evaluate.split``; write the files; return the metrics."""
    ev = config["evaluate"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = data_io.read_manifest(manifest_path)
    heads = data_io.output_heads(config, manifest)
    model, meta = load_finetuned(config, finetuned_ckpt, head, heads)
    heads = meta["heads"]
    dataset = data_io.build_dataset(config, manifest_path, results_dir, ev["split"], "test")
    loader = data_io.build_loader(dataset, int(ev["batch_size"]), int(ev["num_workers"]),
                                  shuffle=False, seed=0, drop_last=False, distributed=False)
    apply_cpu_threads(config["engine"])
    device = select_device(config["engine"], rank_info())
    view_ids, logits = predict_views(model, loader, device, config["engine"], list(heads))

    ks = [int(k) for k in ev["topk"]]
    masking = meta.get("pretrain_masking", "unknown")
    metrics: dict = {
        "dataset": config["dataset"]["name"], "split": ev["split"], "checkpoint": str(finetuned_ckpt),
        "pretrain_masking": masking, "finetune_head": head,
        "variant": variant_name(masking, head), "average": ev["average"],
        "views_per_clip": int(dataset.num_clips * dataset.num_crops),
        "n_skipped_clips": int(dataset.n_skipped),
        # which epoch's weights the checkpoint holds (finetune.selection; None: not ours)
        "selection": meta.get("selection"),
        # the fine-tuning's batch plan as run (mofo.recipe.batch; None: not ours)
        "batch": meta.get("batch"),
    }
    clip_order, scores, probs, n_views = clip_scores(view_ids, logits, ev["average"])
    outputs, actions = scored_outputs(heads, meta, finetuned_ckpt, scores, probs)
    tables = []
    for name, num_classes in outputs.items():
        labels = clip_labels(dataset, clip_order, LABEL_COLUMNS[name])
        res = classification_metrics(scores[name], labels, num_classes, ks)
        confusion = res.pop("confusion")
        prefix = "" if name == "label" else f"{name}_"
        metrics.update({f"{prefix}{k}": v for k, v in res.items()})
        fig_name = CONFUSION if name in ("label", "verb") else f"confusion_{name}.png"
        confusion_figure(confusion, out_dir / fig_name,
                         data_io.class_names(config, num_classes) if name == "label" else None,
                         title=f"{metrics['variant']} on {metrics['dataset']} {ev['split']} "
                               f"({name})")
        tables.append(predictions_table(clip_order, probs[name], labels, n_views, prefix))
    predictions = tables[0]
    for extra in tables[1:]:
        predictions = predictions.merge(extra.drop(columns="n_views"), on="clip_id")
    if "verb" in outputs:
        verb = clip_labels(dataset, clip_order, "verb_class")
        noun = clip_labels(dataset, clip_order, "noun_class")
        metrics.update(epic_action_results(probs, verb, noun, actions, ks, predictions))
    predictions.to_csv(out_dir / PREDICTIONS, index=False, float_format="%.5f")
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = stage_arg_parser("multi-view evaluation of a fine-tuned checkpoint")
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint.pt")
    parser.add_argument("--head", required=True, choices=["mean", "mca"])
    args = parser.parse_args(argv)
    config = load_config(args.config)
    manifest, results_dir = resolve_paths(config, args)
    metrics = run(config, manifest, results_dir, args.checkpoint, args.head, args.out)
    print(json.dumps({k: metrics[k] for k in ("variant", "top1", "top5") if k in metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
