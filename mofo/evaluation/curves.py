"""Report figures drawn from what the stages wrote: training curves and the variant table.

``draw_training_curves`` reads the pretraining and fine-tuning ``metrics.jsonl`` (records of
``type`` ``step`` / ``epoch``, see :mod:`mofo.training.engine`) and the evaluation's
``metrics.json`` and draws loss, learning rate and accuracy per epoch in one picture;
``draw_table_figure`` draws ``table.csv`` (top-1 / top-5 per variant, the paper's beside ours
where it reports the dataset). Matplotlib only (Agg), nothing is trained or evaluated here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mofo.evaluation.table import PAPER
from mofo.viz.figures import save_figure


def read_metrics(path: str | Path | None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none when the file is missing, or for no path: a
    variant without pretraining); a resumed run's repeated steps keep their last record."""
    if not path:
        return []
    path = Path(path)
    if not path.exists():
        return []
    records: dict[tuple[str, int, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the next run rewrites it
        records[(rec.get("type", ""), int(rec.get("epoch", -1)), int(rec.get("step", -1)))] = rec
    return sorted(records.values(), key=lambda r: (r.get("step", 0), r.get("type", "")))


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        if rec.get("type") == kind and isinstance(rec.get(key), (int, float)):
            value = float(rec[key])
            if math.isfinite(value):
                xs.append(float(rec["epoch"]) + (1.0 if kind == "epoch" else 0.0))
                ys.append(value)
    return xs, ys


def _step_x(records: list[dict], steps_key: str = "step") -> list[float]:
    """Step records placed on the epoch axis (epoch + fraction of the epoch's steps)."""
    per_epoch: dict[int, list[dict]] = {}
    for rec in records:
        if rec.get("type") == "step":
            per_epoch.setdefault(int(rec["epoch"]), []).append(rec)
    xs = []
    for epoch, recs in sorted(per_epoch.items()):
        n = len(recs)
        xs.extend(epoch + (i + 1) / n for i in range(n))
    return xs


def accuracy_keys(records: list[dict]) -> list[str]:
    """Epoch-record keys that hold an accuracy (``*acc*`` / ``*top1*`` / ``*top5*``)."""
    keys = {k for r in records if r.get("type") == "epoch" for k in r}
    return sorted(k for k in keys if any(t in k for t in ("acc", "top1", "top5")))


def draw_training_curves(
    pretrain_metrics: str | Path | None,
    finetune_metrics: str | Path,
    eval_metrics: str | Path | None,
    out_png: str | Path,
    title: str = "",
) -> Path:
    """Loss (pretraining, fine-tuning), learning rate and accuracy per epoch, one picture."""
    pre, ft = read_metrics(pretrain_metrics), read_metrics(finetune_metrics)
    evaluation = json.loads(Path(eval_metrics).read_text()) if eval_metrics else {}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, records, name in ((axes[0], pre, "pretraining"), (axes[1], ft, "fine-tuning")):
        steps = [r for r in records if r.get("type") == "step" and "loss" in r]
        if steps:
            ax.plot(_step_x(steps), [r["loss"] for r in steps], ".", color="0.6", ms=3,
                    label="per logged step")
        xs, ys = _series(records, "epoch", "loss")
        ax.plot(xs, ys, "o-", color="C0" if name == "pretraining" else "C1", label="epoch mean")
        ax.set(title=f"{name} loss", xlabel="epoch", ylabel="loss")
        if not records:
            ax.text(0.5, 0.5, "no metrics.jsonl", ha="center", transform=ax.transAxes)
        ax.legend(fontsize=8)
    ax = axes[2]
    for records, name, color in ((pre, "pretraining", "C0"), (ft, "fine-tuning", "C1")):
        steps = [r for r in records if r.get("type") == "step" and "lr" in r]
        ax.plot(_step_x(steps), [r["lr"] for r in steps], "-", color=color, label=name)
    ax.set(title="learning rate", xlabel="epoch", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(fontsize=8)
    ax = axes[3]
    keys = accuracy_keys(ft)
    for i, key in enumerate(keys):
        xs, ys = _series(ft, "epoch", key)
        ax.plot(xs, ys, "o-", color=f"C{i + 2}", label=key)
    final = {k: v for k, v in evaluation.items() if k in ("top1", "top5") and v is not None}
    epochs = max((float(r.get("epoch", 0)) + 1 for r in ft if r.get("type") == "epoch"), default=1)
    for i, (key, value) in enumerate(sorted(final.items())):
        ax.plot([epochs], [value], "*", ms=14, color=f"C{i + 4}", label=f"test {key}: {value:.1f}")
    ax.set(title="accuracy (%)", xlabel="epoch", ylim=(0, 105), xlim=(0, epochs + 0.5))
    if not keys:
        ax.text(0.5, 0.93, "per-epoch accuracy not logged; * = test after the last epoch",
                ha="center", fontsize=7, transform=ax.transAxes)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png, dpi=90)


def draw_table_figure(table_csv: str | Path, out_png: str | Path, dataset: str = "demo") -> Path:
    """Accuracy of every variant (``table.csv``: ``<metric>_mean`` bars with ``<metric>_std``
    error bars over the seeds), the paper's numbers beside ours when it reports ``dataset``."""
    import pandas as pd

    table = pd.read_csv(table_csv)
    table = table[table["top1_mean"].notna() | table.filter(like="verb_top1_mean").notna().any(axis=1)]
    metrics = [m for m in ("top1", "top5", "verb_top1", "noun_top1", "action_top1")
               if f"{m}_mean" in table and table[f"{m}_mean"].notna().any()]
    paper: Mapping[str, Mapping[str, float]] = PAPER.get(dataset, {})
    fig, ax = plt.subplots(figsize=(min(14, max(6, 1.2 * len(table) * max(len(metrics), 1))), 4))
    width = 0.8 / max(len(metrics) * (2 if paper else 1), 1)
    x = range(len(table))
    slot = 0
    for i, metric in enumerate(metrics):
        pos = [xi - 0.4 + width * (slot + 0.5) for xi in x]
        bars = ax.bar(pos, table[f"{metric}_mean"], width, yerr=table[f"{metric}_std"].fillna(0),
                      capsize=3, label=f"ours {metric} (mean ± std over seeds)", color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        slot += 1
        if paper:
            pos = [xi - 0.4 + width * (slot + 0.5) for xi in x]
            values = [paper.get(v, {}).get(metric, float("nan")) for v in table["variant"]]
            ax.bar(pos, values, width, label=f"paper {metric}", color=f"C{i}", alpha=0.4)
            slot += 1
    ax.set_xticks(list(x), [f"{v}\n{m}+{h}\n{n} seed(s)" for v, m, h, n in
                            zip(table["variant"], table["pretrain_masking"],
                                table["finetune_head"], table["n_seeds"], strict=True)])
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title=f"variant table ({dataset})")
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    return save_figure(fig, out_png, dpi=90)
