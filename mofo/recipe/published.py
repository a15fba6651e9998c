"""The published recipe of a paper rerun, and how a configuration differs from it.

``config/published.yaml`` lists every setting a MOFO paper rerun takes from a publication
(paper, authors' code, VideoMAE's scripts) with its source; ``config/ssv2.yaml`` and
``config/epic100.yaml`` give exactly those values, and each deliberate deviation is a named
overlay in ``config/deviations/`` (``<name>.yaml``, its first comment paragraph says what it
changes). From these files alone:

* :func:`deviations` lists the settings of a merged config that differ from the published
  values of its dataset;
* :func:`recipe_label` names them for the results table: ``published``, or
  ``published + robust-boxes`` (the deviation overlays whose every key the config carries),
  plus any other changed key as ``key=value``;
* :func:`markdown` writes ``docs/RECIPE.md`` (``mofo recipe --markdown``), ending with the
  file's ``known_differences``: where a rerun differs from the published runs and no setting
  can say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mofo import provenance
from mofo.config import REPO_ROOT, load_config, load_yaml

PUBLISHED = REPO_ROOT / "config" / "published.yaml"
DEVIATIONS_DIR = REPO_ROOT / "config" / "deviations"
DATASETS = {"ssv2": "SSV2", "epic100": "EPIC-KITCHENS-100"}
_MISSING = object()


@dataclass(frozen=True)
class Setting:
    key: str  # dotted config key
    values: dict[str, Any]  # dataset name -> published value (only where it applies)
    source: str  # where it is published


def published_settings(path: str | Path = PUBLISHED) -> list[Setting]:
    """The entries of ``config/published.yaml`` in file order."""
    entries = load_yaml(path).get("settings") or []
    return [Setting(e["key"], {d: e[d] for d in DATASETS if d in e}, e["source"])
            for e in entries]


def lookup(config: dict, dotted: str) -> Any:
    """The value at ``dotted`` (``_MISSING`` if absent)."""
    return provenance.lookup(config, dotted, _MISSING)


def same(a: Any, b: Any) -> bool:
    """Equal as config values: numbers within 1e-9 relative, lists element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def deviations(config: dict, settings: list[Setting] | None = None) -> list[tuple[str, Any, Any]]:
    """``[(key, published, ours)]`` for the config's dataset; ``[]`` where every published
    setting is kept (or the dataset has no published recipe)."""
    name = config["dataset"]["name"]
    out = []
    for setting in settings if settings is not None else published_settings():
        if name in setting.values:
            ours = lookup(config, setting.key)
            if ours is _MISSING or not same(ours, setting.values[name]):
                out.append((setting.key, setting.values[name],
                            None if ours is _MISSING else ours))
    return out


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def deviation_overlays() -> dict[str, dict[str, Any]]:
    """``{overlay name: {dotted key: value}}`` of ``config/deviations/*.yaml``."""
    return {path.stem: _flatten(load_yaml(path)) for path in sorted(DEVIATIONS_DIR.glob("*.yaml"))}


def recipe_label(config: dict) -> str:
    """``published``, ``published + <overlay> + ...`` or with ``; also key=value`` for
    changes no deviation overlay explains; ``own (<dataset>: no published recipe)`` for a
    dataset the paper does not report."""
    name = config["dataset"]["name"]
    if name not in DATASETS:
        return f"own ({name}: no published recipe)"
    left = {key: ours for key, _pub, ours in deviations(config)}
    named = []
    for overlay, keys in deviation_overlays().items():
        applies = all(same(lookup(config, k), v) for k, v in keys.items())
        if applies and any(k in left for k in keys):
            named.append(overlay)
            for key in keys:
                left.pop(key, None)
    label = " + ".join(["published", *named])
    if left:
        label += "; also " + ", ".join(f"{k}={v}" for k, v in left.items())
    return label


def _cell(value: Any) -> str:
    if value is _MISSING:
        return "–"
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _overlay_summary(path: Path) -> str:
    """The overlay's first comment paragraph: its leading comment lines, joined, up to a blank
    comment line, the ``# Add after ...`` line or the first key."""
    parts = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        if not text or text.startswith("Add after"):
            break
        parts.append(text)
    return " ".join(parts)


def _batch_section(configs: dict[str, dict]) -> list[str]:
    """The total batches as split on 1, 8 and 64 GPUs (mofo.recipe.batch.plan_batch)."""
    from mofo.recipe.batch import TRAINING_STAGES, plan_batch

    lines = ["", "## The total batch on your GPUs", "",
             "Clips per GPU and micro-batch x GPUs x gradient-accumulation steps = the total "
             "batch, and the peak lr, as a job with that many GPUs runs them (the same for both "
             "datasets; `mofo config --profile slurm` shows your profile's):", "",
             "| GPUs per job | " + " | ".join(TRAINING_STAGES) + " |", "|---|---|---|"]
    cfg = configs["ssv2"]
    for gpus in (1, 8, 64):
        cells = []
        for stage in TRAINING_STAGES:
            plan = plan_batch(cfg[stage], gpus)
            cells.append(f"{plan.per_process} clips x {gpus} GPUs x {plan.accum_steps} steps "
                         f"= {plan.total}, lr {plan.lr:.3g}")
        lines.append(f"| {gpus} | " + " | ".join(cells) + " |")
    return lines


def markdown() -> str:
    """``docs/RECIPE.md``: the published settings with their sources, then the deviation
    overlays, each with what it changes."""
    configs = {d: load_config([REPO_ROOT / "config" / f"{d}.yaml"]) for d in DATASETS}
    lines = ["# The published recipe of a paper rerun", "",
             "Generated from `config/published.yaml` by `mofo recipe --markdown`; "
             "`tests/test_recipe.py` checks that this page, `config/ssv2.yaml` and "
             "`config/epic100.yaml` agree with it. Learning rates are per 256 clips and "
             "scaled by total batch / 256; the per-GPU batch and gradient accumulation are "
             "derived from the GPUs a job gets (`mofo/recipe/batch.py`). *ours*: what "
             "`config/<dataset>.yaml` gives (`same` = the published value).", "",
             "| setting | " + " | ".join(f"{n} | ours" for n in DATASETS.values())
             + " | source |",
             "|---|" + "---|---|" * len(DATASETS) + "---|"]
    for s in published_settings():
        cells = []
        for d in DATASETS:
            published, ours = s.values.get(d, _MISSING), lookup(configs[d], s.key)
            applies = published is not _MISSING
            cells += [_cell(published), ("same" if same(ours, published) else _cell(ours))
                      if applies else "–"]
        lines.append(f"| `{s.key}` | " + " | ".join(cells) + f" | {s.source} |")
    lines += _batch_section(configs)
    lines += ["", "## Deliberate deviations (named overlays)", "",
              "Each is a file in `config/deviations/`, added after the dataset's overlay, e.g. "
              "`--configfile config/ssv2.yaml config/deviations/robust-boxes.yaml`; the table's "
              "`recipe` column names the ones a run used.", ""]
    for overlay, keys in deviation_overlays().items():
        summary = _overlay_summary(DEVIATIONS_DIR / f"{overlay}.yaml")
        changes = ", ".join(f"`{k}` = {_cell(v)}" for k, v in keys.items())
        lines.append(f"- **{overlay}**: {summary} Sets {changes}.")
    lines += ["", "## Known differences no setting covers", ""]
    lines += [f"- {text}" for text in load_yaml(PUBLISHED).get("known_differences") or []]
    return "\n".join(lines) + "\n"


def training_params(config: dict, stage: str, processes: int) -> dict[str, Any]:
    """A training job's MLflow params beyond the settings it reads: its batch plan as it will
    run on ``processes`` (``<stage>.plan.total_batch``, ``.per_process``, ``.accum_steps``,
    ``.lr``, ``.exact`` ..., :mod:`mofo.recipe.batch`) and the ``recipe`` it runs
    (:func:`recipe_label`)."""
    from mofo.recipe.batch import plan_batch

    plan = plan_batch(config[stage], processes).as_dict()
    return {**{f"{stage}.plan.{k}": v for k, v in plan.items()}, "recipe": recipe_label(config)}
