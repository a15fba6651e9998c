"""The variant table: one row per (pretraining masking, fine-tuning head), mean and std over
the seeds, and the per-seed values beside it.

Inputs are runs (:class:`Run`): one per variant and seed, with the evaluation's
``metrics.json`` and, where they exist, the pretraining's ``validation.json`` (held-out
reconstruction vs the predict-the-mean floor, ``mofo.training.validation``) and the probe's
``metrics.json`` (kNN, linear and attentive probes of the pretrained encoder). A run without a
fine-tuned model (``metrics`` None) is a probe-only row, e.g. the randomly initialised encoder.

Outputs:

* ``table_seeds.csv``: one row per run: ``variant, pretrain_masking, finetune_head,
  label_fraction, seed, top1, top5, probe_knn, probe_linear, probe_attentive, recon_ratio,
  recon_ratio_inbox, recon_ratio_outbox``
  (+ the EPIC-KITCHENS-100 columns), then the fine-tuning as run (:func:`training_columns`:
  ``total_batch, accum_steps, lr, batch_exact, selection, selected_epoch``) and ``recipe``
  (``published`` or the deviations, ``mofo.recipe.published.recipe_label``);
* ``table.csv``: one row per variant: ``variant, pretrain_masking, finetune_head,
  label_fraction, n_seeds, top1_mean, top1_std, top5_mean, top5_std``, mean and std of each
  probe (``probe_knn_mean, probe_knn_std``, linear, attentive), ``recon_ratio_mean`` (+
  in/out-of-box recon ratios, + EPIC means/stds, + the training
  columns, one value when the seeds agree, + ``recipe``); empty where a value does not apply; std is the sample standard deviation (n - 1), empty for one seed;
* ``table.md``: mean ± std, the paper's numbers beside ours where the paper reports the
  dataset, and under it which differences are larger than the seed spread (:func:`verdicts`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mofo.provenance import SCRATCH

# (masking, head) -> the paper's label for its four variants, in the paper's row order.
VARIANTS: dict[tuple[str, str], str] = {
    ("tube", "mean"): "VideoMAE",
    ("mofo", "mean"): "MOFO*",
    ("tube", "mca"): "MOFO**",
    ("mofo", "mca"): "MOFO†",
}
BASELINE = "VideoMAE"  # the row every other variant's top-1 is compared with
RANDOM_ENCODER = "Random init"  # the probe-only reference row every encoder's kNN is compared with

# Paper Table 1 / README (ViT-B): SSV2 top-1/top-5, EPIC-100 verb/noun/action top-1.
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "ssv2": {
        "VideoMAE": {"top1": 70.8, "top5": 92.4},
        "MOFO*": {"top1": 72.7, "top5": 94.2},
        "MOFO**": {"top1": 74.7, "top5": 95.0},
        "MOFO†": {"top1": 75.5, "top5": 95.3},
    },
    "epic100": {
        "VideoMAE": {"verb_top1": 71.6, "noun_top1": 66.0, "action_top1": 53.2},
        "MOFO*": {"verb_top1": 73.0, "noun_top1": 67.1, "action_top1": 54.1},
        "MOFO**": {"verb_top1": 74.0, "noun_top1": 68.0, "action_top1": 54.5},
        "MOFO†": {"verb_top1": 74.2, "noun_top1": 68.1, "action_top1": 54.5},
    },
}

KEY_COLUMNS = ["variant", "pretrain_masking", "finetune_head", "label_fraction"]
ACCURACY = ["top1", "top5"]
EPIC_ACCURACY = ["verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5"]
# our column -> the probe's key (mofo/evaluation/probe.py)
PROBE = {"probe_knn": "knn_top1", "probe_linear": "linear_top1",
         "probe_attentive": "attentive_top1"}
RECON = ["recon_ratio", "recon_ratio_inbox", "recon_ratio_outbox"]


@dataclass(frozen=True)
class Run:
    """One variant at one seed and the files it produced (None = does not apply)."""

    variant: str
    masking: str
    head: str
    seed: int
    label_fraction: float | None = None  # fine-tuning's share of the train labels (1 = all)
    metrics: str | Path | None = None
    validation: str | Path | None = None
    probe: str | Path | None = None


def variant_name(masking: str, head: str) -> str:
    """Paper label of a (masking, head) pair; ``<masking>+<head>`` when not one of the four."""
    return VARIANTS.get((masking, head), f"{masking}+{head}")


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metrics file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _selection(metrics: dict) -> str:
    """How the evaluated weights were chosen: ``last``, or ``best on <split>`` -- flagged
    when that split is the one the table reports (the MOFO code's protocol)."""
    selection = metrics.get("selection") or {}
    rule = selection.get("rule", "")
    if rule != "best":
        return rule
    split = selection.get("split", "")
    reported = " = the reported split" if split == metrics.get("split") else ""
    return f"best on {split}{reported}"


def training_columns(metrics: dict) -> dict:
    """The fine-tuning's recipe as run, from an evaluation's ``metrics.json``: ``total_batch``,
    ``accum_steps``, ``lr`` (peak), ``batch_exact`` (False: the configured total could not be
    met on the job's GPUs), ``selection`` and ``selected_epoch``. Empty for runs that
    predate these records."""
    batch = metrics.get("batch") or {}
    selection = metrics.get("selection") or {}
    lr = batch.get("lr")
    values = {"total_batch": batch.get("total_batch"), "accum_steps": batch.get("accum_steps"),
              "lr": None if lr is None else f"{lr:.3g}", "batch_exact": batch.get("exact"),
              "selection": _selection(metrics) or None, "selected_epoch": selection.get("epoch")}
    return {k: None if v is None else str(v) for k, v in values.items()}  # text, not floats


TRAINING = ["total_batch", "accum_steps", "lr", "batch_exact", "selection"]


def seed_rows(runs: Sequence[Run]) -> pd.DataFrame:
    """``table_seeds.csv``'s rows: one per run, in the given order."""
    rows = []
    for run in runs:
        tuned = run.metrics is not None
        row = {"variant": run.variant, "pretrain_masking": run.masking,
               "finetune_head": run.head if tuned else "",
               "label_fraction": _number(run.label_fraction) if tuned else float("nan"),
               "seed": run.seed}
        if run.metrics is not None:
            m = _read_json(run.metrics)
            row.update({c: _number(m[c]) for c in ACCURACY + EPIC_ACCURACY if c in m})
            row.update(training_columns(m))
        if run.probe is not None:
            p = _read_json(run.probe)
            row.update({ours: _number(p.get(theirs)) for ours, theirs in PROBE.items()})
        if run.validation is not None:
            v = _read_json(run.validation)
            row["recon_ratio"] = _number(v.get("ratio"))
            row["recon_ratio_inbox"] = _number((v.get("inbox") or {}).get("ratio"))
            row["recon_ratio_outbox"] = _number((v.get("outbox") or {}).get("ratio"))
        rows.append(row)
    return pd.DataFrame(rows)


def _std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def summarize(per_seed: pd.DataFrame, epic: bool = False) -> pd.DataFrame:
    """``table.csv``: per variant (first-seen order), n_seeds and mean/std of each metric."""
    accuracy = ACCURACY + (EPIC_ACCURACY if epic else [])
    rows = []
    for variant, group in per_seed.groupby("variant", sort=False):
        first = group.iloc[0]
        row = {"variant": variant, "pretrain_masking": first["pretrain_masking"],
               "finetune_head": first["finetune_head"], "label_fraction": first["label_fraction"],
               "n_seeds": int(group["seed"].nunique())}
        for col in [*accuracy, *PROBE]:
            values = group[col] if col in group else pd.Series(dtype=float)
            row[f"{col}_mean"] = float(values.mean()) if values.notna().any() else float("nan")
            row[f"{col}_std"] = _std(values)
        for col in RECON:
            values = group[col] if col in group else pd.Series(dtype=float)
            row[f"{col}_mean"] = float(values.mean()) if values.notna().any() else float("nan")
        for col in TRAINING:  # one value when the seeds agree, else all of them
            values = group[col].dropna().astype(str).unique() if col in group else []
            row[col] = values[0] if len(values) == 1 else " / ".join(values)
        rows.append(row)
    return pd.DataFrame(rows)


def _difference(a: pd.Series, b: pd.Series, metric: str) -> tuple[float, float] | None:
    """(mean difference a - b, its 2-standard-error spread), None without two seeds on both."""
    if a["n_seeds"] < 2 or b["n_seeds"] < 2 or any(
            math.isnan(x) for x in (a[f"{metric}_std"], b[f"{metric}_std"])):
        return None
    spread = 2 * math.sqrt(a[f"{metric}_std"] ** 2 / a["n_seeds"] + b[f"{metric}_std"] ** 2 / b["n_seeds"])
    return a[f"{metric}_mean"] - b[f"{metric}_mean"], spread


def _comparisons(by_name: dict) -> list[tuple[str, str, str, str]]:
    """(variant, reference, metric, words): each full-label variant's top-1 against
    ``BASELINE``'s; each variant fine-tuned on a share of the labels against the scratch row of
    the same share (what pretraining buys with few labels); each encoder's attentive probe
    against the random encoder's."""
    def share(row) -> float:
        value = row["label_fraction"]
        return 1.0 if value is None or math.isnan(value) else float(value)

    pairs = []
    for name, row in by_name.items():
        if math.isnan(row["top1_mean"]):
            continue
        if share(row) == 1.0 and name != BASELINE and BASELINE in by_name:
            pairs.append((name, BASELINE, "top1", "top-1"))
        elif share(row) < 1.0 and row["pretrain_masking"] != SCRATCH:
            ref = next((other for other, r in by_name.items() if r["pretrain_masking"] == SCRATCH
                        and share(r) == share(row) and not math.isnan(r["top1_mean"])), None)
            if ref is not None:
                pairs.append((name, ref, "top1", f"top-1, {share(row):.0%} of the labels"))
    if RANDOM_ENCODER in by_name:
        pairs += [(name, RANDOM_ENCODER, "probe_attentive", "attentive probe")
                  for name, row in by_name.items() if name != RANDOM_ENCODER
                  and not math.isnan(row["probe_attentive_mean"])]
    return pairs


def verdicts(summary: pd.DataFrame, per_seed: pd.DataFrame) -> list[str]:
    """One sentence per comparison (:func:`_comparisons`), then each encoder's kNN probe
    against the random encoder's. A difference is "larger than the seed spread" when it
    exceeds two standard errors of the difference of the two means
    (2 * sqrt(std_a^2 / n_a + std_b^2 / n_b)); with one seed there is no spread to compare with."""
    lines = []
    by_name = {row["variant"]: row for _, row in summary.iterrows()}
    for name, ref, metric, words in _comparisons(by_name):
        diff = _difference(by_name[name], by_name[ref], metric)
        if diff is None:
            lines.append(f"- {name} vs {ref} ({words}): fewer than 2 seeds, no spread to judge by.")
            continue
        delta, spread = diff
        judged = "larger than" if abs(delta) > spread else "within"
        lines.append(f"- {name} vs {ref} ({words}): {delta:+.1f} points, {judged} the seed spread "
                     f"(±{spread:.1f}).")
    if RANDOM_ENCODER in by_name:
        ref = per_seed[per_seed["variant"] == RANDOM_ENCODER]["probe_knn"].mean()
        for name, row in by_name.items():
            if name == RANDOM_ENCODER or math.isnan(row["probe_knn_mean"]):
                continue
            lines.append(f"- {name}'s encoder, kNN probe: {row['probe_knn_mean'] - ref:+.1f} points "
                         f"over the randomly initialised encoder.")
    return lines


def _cell(mean: float, std: float = float("nan")) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def markdown_table(summary: pd.DataFrame, per_seed: pd.DataFrame, dataset_name: str) -> str:
    """Markdown: mean ± std over seeds, the paper's numbers beside ours when it reports this
    dataset, the probe and reconstruction columns, then :func:`verdicts`."""
    epic = dataset_name == "epic100"
    metrics = ["verb_top1", "noun_top1", "action_top1"] if epic else ["top1", "top5"]
    paper = PAPER.get(dataset_name)
    header = ["variant", "pretraining", "head", "labels", "seeds"]
    for m in metrics:
        header += [f"{m} (ours)"] + ([f"{m} (paper)"] if paper else [])
    header += ["kNN probe", "linear probe", "attentive probe", "recon / floor (in box, out)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        share = row["label_fraction"]
        cells = [str(row["variant"]), str(row["pretrain_masking"]), str(row["finetune_head"]),
                 "" if math.isnan(share) else f"{share:.0%}", str(row["n_seeds"])]
        for m in metrics:
            cells.append(_cell(row[f"{m}_mean"], row[f"{m}_std"]))
            if paper:
                cells.append(_cell(paper.get(row["variant"], {}).get(m, float("nan"))))
        cells += [_cell(row[f"{col}_mean"], row[f"{col}_std"]) for col in PROBE]
        recon = row["recon_ratio_mean"]
        cells.append("–" if math.isnan(recon) else
                     f"{recon:.2f} ({row['recon_ratio_inbox_mean']:.2f}, {row['recon_ratio_outbox_mean']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    title = f"Variants on {dataset_name} (accuracy in %, mean ± std over seeds)"
    if paper:
        note = ("Paper numbers: MOFO paper Table 1 (ViT-B, 16 frames at 224x224, one run); ours "
                "come from this run's configuration, so they are comparable only at the paper's "
                "settings.")
    else:
        note = (f"The paper reports no numbers for '{dataset_name}' (it reports SSV2 and "
                "EPIC-KITCHENS-100); only this run's numbers are shown.")
    note += (" labels: the share of the train split's labels fine-tuning used (stratified by "
             "class, drawn from the seed). Probes: top-1 of frozen features, mean ± std.")
    note += (" recon / floor: held-out reconstruction loss over the predict-the-patch-mean "
             "loss (1 = nothing learned), inside and outside the motion box.")
    return (f"## {title}\n\n" + "\n".join(lines) + f"\n\n{note}\n\n"
            + _training_note(summary) +
            "Which differences are larger than the seed spread:\n\n"
            + "\n".join(verdicts(summary, per_seed)) + "\n")


def _training_note(summary: pd.DataFrame) -> str:
    """Which recipe the rows ran and, per variant (one line when all agree), the fine-tuning's
    total batch, accumulation steps, peak lr and checkpoint selection as run."""
    if summary.empty:
        return ""
    lines = [f"Recipe: {summary['recipe'].iloc[0]} (config/published.yaml, docs/RECIPE.md)."]
    described = {}
    for _, row in summary.iterrows():
        if str(row.get("total_batch") or "") in ("", "nan"):
            continue  # a probe-only row, or metrics from before these records
        text = (f"total batch {row['total_batch']} ({row['accum_steps']} accumulation steps"
                f"{'' if row['batch_exact'] == 'True' else ', NOT the configured total'}), "
                f"peak lr {row['lr']}, checkpoint: {row['selection']}")
        described.setdefault(text, []).append(str(row["variant"]))
    if len(described) == 1:
        lines.append(f"Fine-tuning as run: {next(iter(described))}.")
    else:
        lines += [f"Fine-tuning as run, {', '.join(names)}: {text}."
                  for text, names in described.items()]
    return "\n".join(lines) + "\n\n"


def _write_csv(df: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.3f")


def make_table(runs: Sequence[Run], out_csv: str | Path, out_seeds_csv: str | Path,
               out_md: str | Path, dataset_name: str, recipe: str = "") -> pd.DataFrame:
    """Write ``table.csv``, ``table_seeds.csv`` and ``table.md``; return the summary.
    ``recipe``: which recipe the rows ran (``mofo.recipe.published.recipe_label`` of the config), a
    column of both tables."""
    per_seed = seed_rows(runs)
    epic = dataset_name == "epic100"
    for col in ["seed", *ACCURACY, *(EPIC_ACCURACY if epic else []), *PROBE, *RECON]:
        if col not in per_seed:
            per_seed[col] = np.nan
    for col in [*TRAINING, "selected_epoch"]:
        if col not in per_seed:
            per_seed[col] = None
    per_seed["recipe"] = recipe
    summary = summarize(per_seed, epic)
    summary["recipe"] = recipe
    _write_csv(per_seed, out_seeds_csv)
    _write_csv(summary, out_csv)
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    Path(out_md).write_text(markdown_table(summary, per_seed, dataset_name))
    return summary
