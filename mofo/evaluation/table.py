"""The variant table: one row per (pretraining masking, fine-tuning head) pair.

VideoMAE = tube + mean, MOFO* = mofo + mean, MOFO** = tube + mca, MOFO† = mofo + mca
(paper Table 1). ``table.csv`` has ``variant, pretrain_masking, finetune_head, top1, top5``
(+ ``verb_top1, noun_top1, action_top1`` ... for EPIC-KITCHENS-100); ``table.md`` puts the
paper's numbers beside ours where the paper reports the dataset (ssv2, epic100).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

# (masking, head) -> variant label, in the paper's row order.
VARIANTS: dict[tuple[str, str], str] = {
    ("tube", "mean"): "VideoMAE",
    ("mofo", "mean"): "MOFO*",
    ("tube", "mca"): "MOFO**",
    ("mofo", "mca"): "MOFO†",
}

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

BASE_COLUMNS = ["variant", "pretrain_masking", "finetune_head", "top1", "top5"]
EPIC_COLUMNS = ["verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5"]


def variant_name(masking: str, head: str) -> str:
    """Paper label of a (masking, head) pair; ``<masking>+<head>`` when not one of the four."""
    return VARIANTS.get((masking, head), f"{masking}+{head}")


def _read_metrics(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metrics file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def collect_rows(variant_metric_jsons: Mapping[str, str | Path] | Sequence[str | Path]) -> pd.DataFrame:
    """One row per metrics.json. A mapping's keys name the variants; for a list the name
    comes from the file's ``pretrain_masking`` / ``finetune_head``."""
    items = (list(variant_metric_jsons.items()) if isinstance(variant_metric_jsons, Mapping)
             else [(None, p) for p in variant_metric_jsons])
    rows = []
    for name, path in items:
        m = _read_metrics(path)
        masking = m.get("pretrain_masking", "unknown")
        head = m.get("finetune_head", "unknown")
        row = {"variant": name or variant_name(masking, head), "pretrain_masking": masking,
               "finetune_head": head}
        for col in BASE_COLUMNS[3:] + EPIC_COLUMNS:
            if col in m:
                row[col] = m[col]
        rows.append(row)
    order = {label: i for i, label in enumerate(VARIANTS.values())}
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=BASE_COLUMNS)
    df["_order"] = df["variant"].map(lambda v: order.get(v, len(order)))
    return df.sort_values(["_order", "variant"], kind="stable").drop(columns="_order")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.1f}"


def markdown_table(df: pd.DataFrame, dataset_name: str) -> str:
    """Markdown: our numbers, and the paper's beside them when it reports this dataset."""
    epic = dataset_name == "epic100"
    metrics = ["verb_top1", "noun_top1", "action_top1"] if epic else ["top1", "top5"]
    paper = PAPER.get(dataset_name)
    header = ["variant", "pretraining masking", "fine-tuning head"]
    for m in metrics:
        header += [f"{m} (ours)"] + ([f"{m} (paper)"] if paper else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in df.iterrows():
        cells = [str(row["variant"]), str(row["pretrain_masking"]), str(row["finetune_head"])]
        for m in metrics:
            cells.append(_fmt(row.get(m)))
            if paper:
                cells.append(_fmt(paper.get(row["variant"], {}).get(m)))
        lines.append("| " + " | ".join(cells) + " |")
    title = f"Variants on {dataset_name} (top-1 / top-5 accuracy in %)"
    if paper:
        note = ("Paper numbers: MOFO paper Table 1 (ViT-B, 16 frames at 224x224); ours come "
                "from this run's configuration (model size, epochs, data), so they are "
                "comparable with the paper only at the paper's settings.")
    else:
        note = (f"The paper reports no numbers for '{dataset_name}' (it reports SSV2 and "
                "EPIC-KITCHENS-100); only this run's numbers are shown.")
    return f"## {title}\n\n" + "\n".join(lines) + f"\n\n{note}\n"


def make_table(variant_metric_jsons: Mapping[str, str | Path] | Sequence[str | Path],
               out_csv: str | Path, out_md: str | Path, dataset_name: str) -> pd.DataFrame:
    """Write ``table.csv`` and ``table.md`` from the variants' ``metrics.json`` files."""
    df = collect_rows(variant_metric_jsons)
    columns = BASE_COLUMNS + (EPIC_COLUMNS if dataset_name == "epic100" else [])
    for col in columns:
        if col not in df.columns:
            df[col] = float("nan")
    df = df[columns]
    out_csv, out_md = Path(out_csv), Path(out_md)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_csv, index=False, float_format="%.2f")
    out_md.write_text(markdown_table(df, dataset_name))
    return df
