"""What each stage reads, declared once, and the digests that say "this is the same run".

``STAGE_READS`` names the config keys every stage of the DAG reads. Three things derive from
it and nothing else:

* the rule's rerun trigger: ``params: config_hash=stage_hash(config, "<rule>")`` in
  ``rules/*.smk`` (Snakemake reruns a job whose params changed);
* the MLflow params of the stage's run (``mofo.tracking.stage_run_from_snakemake``);
* the resume provenance of the training stages (``mofo.training.pretrain`` / ``finetune``):
  ``checkpoint-last.pt`` is resumed only when its provenance equals the new run's, which
  also holds a digest of the stage's input files (:func:`inputs_digest`).

A declaration is a tuple of dotted keys. ``"pretrain"`` is the whole section;
``"-pretrain.log_interval"`` takes a key back out (settings that do not change what is
computed: loader workers, logging, checkpoint frequency). A key missing from the config
reads as ``None``, so an overlay that adds a key changes the hash only where it is read.

``VARIANT_READS`` adds the keys that only one variant of a stage reads (a masking strategy's
own section, read by that strategy's pretraining only): ``stage_settings(config, stage,
variant)``, where the rule passes the masking strategy of its pretraining name, so changing
``masking.mgmae`` reruns the mgmae pretrainings and nothing else.

``READS_WHEN`` names keys a stage reads only while one setting has one value (left out of
its settings otherwise, even from inside a section it reads whole): fine-tuning reads
``finetune.selection``, ``finetune.patience`` and ``evaluate.split`` only with ``selection:
best``, so the default ``last`` -- what fine-tuning did before the keys existed -- reruns
nothing and is not rerun by a change of the patience or the evaluated split.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Settings of a training section that change neither the weights nor the metrics.
_TRAIN_IGNORED = ("num_workers", "frame_cache_mb", "log_interval", "checkpoint_every")

# What every pretraining reads, whatever its target. The rule's wildcard (the pretraining
# name, see pretraining_spec) sets masking.strategy and pretrain.target.
_PRETRAIN_READS = (
    "dataset.name", "model", "masking", "-masking.strategy",
    "-masking.mgmae",  # read by the mgmae pretrainings only (VARIANT_READS)
    "augment.pretrain_sampling", "augment.multi_scale_crop", "engine.precision",
    "pretrain", "-pretrain.n_reconstruction_clips", "-pretrain.target",
    *(f"-pretrain.{k}" for k in _TRAIN_IGNORED),
)

STAGE_READS: dict[str, tuple[str, ...]] = {
    "demo_data": ("dataset.demo",),
    # The epic100 classifier and flip are read by fine-tuning / evaluation, not the manifest.
    "manifest": ("dataset", "shards", "-dataset.epic100.classifier",
                 "-dataset.epic100.horizontal_flip"),
    "decode": ("decode", "-decode.threads"),
    # The flow job also keeps the flow of the picture clips (pictures.clips_per_shard), so
    # that pictures never need the full, temporary flow again.
    "optical_flow": ("optical_flow", "-optical_flow.keep", "pictures.clips_per_shard"),
    "motion_map": ("motion_map",),
    "motion_boxes": ("motion_boxes",),
    "motion_pictures": ("pictures",),
    "box_quality": ("model",),
    # MME's trajectories, from the flow they compute again (read by target mme pretrainings only).
    "trajectories": ("trajectories", "optical_flow", "-optical_flow.keep",
                     "-optical_flow.pooled_cells"),
    "pretrain": (*_PRETRAIN_READS, "-pretrain.mme"),
    "pretrain_mme": (*_PRETRAIN_READS, "trajectories"),
    "finetune": (
        "dataset.name", "dataset.demo.classes", "dataset.list.horizontal_flip",
        "dataset.epic100.horizontal_flip", "dataset.epic100.classifier", "model", "augment",
        "-augment.pretrain_sampling", "-augment.multi_scale_crop",
        "-augment.test_clips", "-augment.test_crops", "engine.precision",
        "finetune", *(f"-finetune.{k}" for k in _TRAIN_IGNORED),
    ),
    # finetune.mean_drop_ratio: the mean head's EVEREST token drop also runs at test time.
    # (pretrain reads the whole masking section: masking.everest included.)
    "evaluate": (
        "dataset.name", "dataset.demo.classes", "dataset.epic100.classifier", "model",
        "augment.finetune_sampling",
        "augment.test_clips", "augment.test_crops", "engine.precision",
        "evaluate", "-evaluate.num_workers", "finetune.mean_drop_ratio",
    ),
    # Features of one encoder: its weights (the checkpoint, an input file; for the random
    # reference the {seed} wildcard); one centre view per clip (model grid, temporal sampling).
    "features": ("dataset.name", "model", "augment.finetune_sampling", "engine.precision",
                 "probe.attentive.enabled"),
    "probe": ("probe", "-probe.batch_size", "-probe.num_workers"),
    "table": ("variants", "seeds"),
}

# (stage, variant) -> keys only that variant reads, on top of the stage's own declaration.
VARIANT_READS: dict[tuple[str, str], tuple[str, ...]] = {
    (stage, "mgmae"): ("masking.mgmae",) for stage in ("pretrain", "pretrain_mme")
}


@dataclass(frozen=True)
class Unless:
    """A ``READS_WHEN`` value that applies while the setting is anything but ``value``."""

    value: Any


# stage -> ((setting, value, keys the stage reads only while the setting has that value), ...)
READS_WHEN: dict[str, tuple[tuple[str, Any, tuple[str, ...]], ...]] = {
    "finetune": (
        # selection best validates on evaluate.split after every epoch (mofo/training/selection.py)
        ("finetune.selection", "best",
         ("finetune.selection", "finetune.patience", "evaluate.split")),
        # every label (1.0) is what fine-tuning did before the key existed: it reruns nothing
        ("finetune.label_fraction", Unless(1.0), ("finetune.label_fraction",)),
    ),
}


PRETRAIN_TARGETS = ("pixels", "mme")
#: A pretraining name, the DAG's ``{masking}`` wildcard: ``<strategy>`` or ``<strategy>_<target>``
#: (the rules' wildcard_constraints; config/config.schema.yaml's variants[].masking is
#: ``^PRETRAINING_NAME$``, tests/test_paths.py holds them equal).
PRETRAINING_NAME = r"[a-z]+(_[a-z]+)?"
#: The two names the ``{masking}`` wildcard takes besides pretrainings: a variant's masking
#: ``scratch`` fine-tunes from a random init (no pretraining), and the probes' encoder
#: ``random`` is a pretraining's initial weights (the reference row of every kNN figure).
SCRATCH = "scratch"
RANDOM_ENCODER = "random"


def pretraining_spec(name: str) -> tuple[str, str]:
    """``(masking strategy, target)`` of a pretraining name, the DAG's ``{masking}`` wildcard:
    ``<strategy>`` reconstructs pixels (``tube``, ``mofo``), ``<strategy>_<target>`` predicts
    another target (``tube_mme``, ``mofo_mme``). Only the form and the target are checked
    here; the strategy is checked against the masking registry where the mask is drawn."""
    strategy, sep, target = str(name).partition("_")
    target = target if sep else "pixels"
    named_target = target in PRETRAIN_TARGETS and (target != "pixels" or not sep)
    if not (re.fullmatch(PRETRAINING_NAME, str(name)) and named_target):
        raise ValueError(
            f"pretraining name {name!r}: expected <strategy> (pixel targets, e.g. 'tube') or "
            f"<strategy>_<target> with target in {list(PRETRAIN_TARGETS[1:])} (e.g. 'tube_mme')")
    return strategy, target


#: A fine-tuning name, the DAG's ``{head}`` wildcard: ``<head>`` fine-tunes on the train split's
#: labels as ``finetune.label_fraction`` says (1.0: every one), ``<head>_l<percent>`` on a
#: stratified share of them (a variant's ``label_fraction``: ``mean_l10`` = 10 %).
FINETUNING_NAME = r"[a-z]+(_l\d+)?"


def finetuning_name(head: str, label_fraction: float | None = None) -> str:
    """The fine-tuning name of a variant: ``head``, or ``<head>_l<percent>`` for a variant's
    ``label_fraction`` below 1 (a whole percent from 1 to 99)."""
    if label_fraction is None or float(label_fraction) == 1.0:
        return head
    percent = round(float(label_fraction) * 100)
    if not (0 < float(label_fraction) < 1 and abs(percent - float(label_fraction) * 100) < 1e-9):
        raise ValueError(f"label_fraction {label_fraction!r}: a variant's share of the labels is "
                         "a whole percent between 0.01 and 0.99 (or 1.0, every label)")
    return f"{head}_l{percent}"


def finetuning_spec(name: str) -> tuple[str, float | None]:
    """``(head, label fraction)`` of a fine-tuning name (:data:`FINETUNING_NAME`); the fraction
    is None for a bare head (the config's ``finetune.label_fraction`` applies)."""
    if not re.fullmatch(FINETUNING_NAME, str(name)):
        raise ValueError(f"fine-tuning name {name!r}: expected <head> or <head>_l<percent> "
                         "(e.g. 'mean', 'mca_l10')")
    head, _, percent = str(name).partition("_l")
    if percent and not 0 < int(percent) < 100:
        raise ValueError(f"fine-tuning name {name!r}: the label share is 1 to 99 percent")
    return head, (int(percent) / 100 if percent else None)


def pretrain_stage(target: str) -> str:
    """The ``STAGE_READS`` entry of a pretraining with ``target``: ``pretrain`` (pixels) or
    ``pretrain_<target>``, which also reads that target's settings."""
    if target not in PRETRAIN_TARGETS:
        raise ValueError(f"pretrain.target {target!r}: choose one of {list(PRETRAIN_TARGETS)}")
    return "pretrain" if target == "pixels" else f"pretrain_{target}"


class UnknownStageError(KeyError):
    """A stage name that ``STAGE_READS`` does not declare."""

    def __str__(self) -> str:
        return f"no declaration of what stage {self.args[0]!r} reads (mofo/provenance.py STAGE_READS: {sorted(STAGE_READS)})"


def lookup(config: Mapping[str, Any], dotted: str, missing: Any = None) -> Any:
    """The value at a dotted key (``"optical_flow.tvl1.tau"``), ``missing`` where absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node


def _drop(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def stage_settings(
    config: Mapping[str, Any], stage: str, variant: str | None = None
) -> dict[str, Any]:
    """The config values ``stage`` (for ``variant``, e.g. a pretraining's masking) reads:
    ``{dotted key: value}`` in declaration order, then the variant's own keys."""
    if stage not in STAGE_READS:
        raise UnknownStageError(stage)
    keys = [k for k in STAGE_READS[stage] if not k.startswith("-")]
    settings = {key: copy.deepcopy(lookup(config, key)) for key in keys}
    for removed in (k[1:] for k in STAGE_READS[stage] if k.startswith("-")):
        for key in keys:
            if removed == key:
                settings.pop(key, None)
            elif removed.startswith(key + ".") and isinstance(settings.get(key), dict):
                _drop(settings[key], removed[len(key) + 1:])
    for key in VARIANT_READS.get((stage, variant or ""), ()):
        settings[key] = copy.deepcopy(lookup(config, key))
    _apply_reads_when(settings, config, stage)
    return settings


def _apply_reads_when(settings: dict[str, Any], config: Mapping[str, Any], stage: str) -> None:
    """``READS_WHEN`` on ``settings``: add the conditional keys that apply and are not already
    inside a section read whole; take those that do not apply out (also from such a section)."""
    for setting, value, reads in READS_WHEN.get(stage, ()):
        current = lookup(config, setting)
        applies = current != value.value if isinstance(value, Unless) else current == value
        for key in reads:
            owner = next((k for k in settings if key.startswith(k + ".")), None)
            if applies and owner is None:
                settings[key] = copy.deepcopy(lookup(config, key))
            elif not applies:
                settings.pop(key, None)
                if owner is not None and isinstance(settings[owner], dict):
                    _drop(settings[owner], key[len(owner) + 1:])


def digest(obj: Any) -> str:
    """Stable 16-hex-digit digest of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_hash(config: Mapping[str, Any], stage: str, variant: str | None = None) -> str:
    """Digest of :func:`stage_settings`: a rule's rerun trigger."""
    return digest(stage_settings(config, stage, variant))


# Files up to this size are hashed whole; larger ones by size + their first and last MiB.
WHOLE_FILE_LIMIT = 16 * 2**20
_EDGE = 2**20


def file_digest(path: str | Path) -> str:
    """Content digest of one input file.

    Files up to 16 MiB (manifests, box tables, frame indexes) are hashed whole. Larger files
    (checkpoints) are hashed by size plus their first and last MiB: a ``torch.save`` file is
    a zip whose last bytes are the central directory with a CRC-32 of every tensor, so the
    tail changes whenever any weight does. mtime is not used: a copy of the same results
    elsewhere is the same run. A folder (a Hugging Face checkpoint) is the digest of its
    files' names and digests.
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face checkpoint folder: its files, by name
        parts = [f"{p.name}:{file_digest(p)}" for p in sorted(path.iterdir()) if p.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    size = path.stat().st_size
    sha = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: fh.read(2**20), b""):
                sha.update(block)
        else:
            sha.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            sha.update(fh.read(_EDGE))
    return sha.hexdigest()[:16]


def inputs_digest(files: Mapping[str, str | Path | None]) -> dict[str, str]:
    """``{name: file_digest}`` of a stage's input files, named by the caller (e.g.
    ``"boxes/shard-0000.csv"``) so that the digest does not depend on where the results
    folder lies; a missing file or ``None`` reads as ``"absent"``."""
    return {name: file_digest(path) if path and Path(path).exists() else "absent"
            for name, path in sorted(files.items())}
