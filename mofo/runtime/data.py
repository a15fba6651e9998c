"""The stages' bridge to ``mofo.inputs.dataset``: datasets, loaders and class counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

# SSV2 and EPIC-KITCHENS-100 have fixed label spaces (a subset manifest may not show the
# highest class), so their counts are not inferred from the labels.
FIXED_CLASS_COUNTS = {"ssv2": 174}
EPIC_HEADS = {"verb": 97, "noun": 300}


def action_vocabulary(manifest: pd.DataFrame) -> list[tuple[int, int]]:
    """The action classes of EPIC-KITCHENS-100's ``action`` classifier: the distinct
    ``(verb_class, noun_class)`` pairs of the manifest's train rows (every row, decoded or
    not), sorted by (verb, noun); action index ``i`` is the ``i``-th pair. Deterministic for
    a manifest, whatever its row order."""
    train = manifest[(manifest["split"] == "train") & (manifest["verb_class"] >= 0)
                     & (manifest["noun_class"] >= 0)]
    pairs = sorted({(int(v), int(n)) for v, n in zip(train["verb_class"], train["noun_class"])})
    if not pairs:
        raise ValueError("dataset.epic100.classifier 'action': the manifest has no train clip "
                         "with a verb_class and noun_class, so there are no action classes")
    for verb, noun in pairs:
        if not (verb < EPIC_HEADS["verb"] and noun < EPIC_HEADS["noun"]):
            raise ValueError(f"dataset.epic100.classifier 'action': train pair ({verb}, {noun}) "
                             f"is outside the {EPIC_HEADS['verb']} verb / "
                             f"{EPIC_HEADS['noun']} noun classes")
    return pairs


def epic_actions(config: dict, manifest: pd.DataFrame) -> list[tuple[int, int]] | None:
    """The action vocabulary (:func:`action_vocabulary`) when the run trains EPIC-KITCHENS-100
    with ``dataset.epic100.classifier: action``; None for every other run."""
    # config/config.schema.yaml allows verb_noun | action only
    epic = config["dataset"]["name"] == "epic100"
    if not epic or config["dataset"]["epic100"]["classifier"] != "action":
        return None
    return action_vocabulary(manifest)


def output_heads(config: dict, manifest: pd.DataFrame) -> dict[str, int]:
    """Target name -> class count: ``{"label": C}``; for EPIC-KITCHENS-100 verb/noun, or
    ``{"action": A}`` (A = the train split's (verb, noun) pairs) with the ``action``
    classifier."""
    name = config["dataset"]["name"]
    if name == "epic100":
        actions = epic_actions(config, manifest)
        return dict(EPIC_HEADS) if actions is None else {"action": len(actions)}
    if name == "demo":
        return {"label": len(config["dataset"]["demo"]["classes"])}
    if name in FIXED_CLASS_COUNTS:
        return {"label": FIXED_CLASS_COUNTS[name]}
    labels = manifest["label"][manifest["label"] >= 0]
    if labels.empty:
        raise ValueError("the manifest has no labelled clips; cannot tell the class count")
    return {"label": int(labels.max()) + 1}


def class_names(config: dict, num_classes: int) -> list[str]:
    """Readable class names where the config knows them (demo), else the indices."""
    if config["dataset"]["name"] == "demo":
        return list(config["dataset"]["demo"]["classes"])
    return [str(i) for i in range(num_classes)]


def read_manifest(manifest_path: str | Path) -> pd.DataFrame:
    from mofo.data.manifest import read_manifest as _read

    return _read(manifest_path)


def pretraining_reads(strategy: str, target: str) -> dict[str, bool]:
    """The optional inputs of a pretraining (``mofo.paths.training_inputs`` flags): MME's
    trajectories for target ``mme``, the pooled flow for a masking that follows the flow
    (``mgmae``). The rules (rules/common.smk, from the ``{masking}`` wildcard) and the resume
    check (``mofo.training.pretrain.provenance``) both ask here."""
    from mofo.masking import needs_token_flow

    return {"trajectories": target == "mme", "pooled_flow": needs_token_flow(strategy)}


def input_files(manifest_path: str | Path, results_dir: str | Path,
                trajectories: bool = False, pooled_flow: bool = False) -> dict[str, Path]:
    """The files a training stage reads (``mofo.paths.training_inputs``, the list the rules
    declare), for every shard of the manifest, named relative to the results folder
    (``"boxes/shard-0000.csv"``); the manifest is ``manifest_path`` under the name
    ``manifest.csv``. Their digests are part of the run's provenance
    (``mofo.provenance.inputs_digest``): new boxes, frames, flow or clips make a new run. A
    frame pack is covered by its index (offsets and sizes of every frame), not read whole."""
    from mofo.paths import shard_name, sibling, training_inputs

    shards = [shard_name(int(s)) for s in sorted(read_manifest(manifest_path)["shard"].unique())]
    declared = training_inputs("", shards, trajectories=trajectories, pooled_flow=pooled_flow)
    files = {}
    for role, names in declared.items():
        for name in [names] if isinstance(names, str) else names:
            if role == "manifest":
                files[name] = Path(manifest_path)
                continue
            if role == "frames":
                name = sibling(name, "frames_pack", "frames_index")
            files[name] = Path(results_dir) / name
    return files


def build_dataset(config: dict, manifest_path: str | Path, results_dir: str | Path, split: str,
                  mode: str, clip_ids: Any = None, **kwargs: Any):
    """``mofo.inputs.dataset.VideoClipDataset`` for one split and mode; ``clip_ids`` (None =
    all) keeps only those clips of the split."""
    from mofo.inputs.dataset import VideoClipDataset

    manifest = read_manifest(manifest_path)
    if clip_ids is not None:
        manifest = manifest[(manifest["split"] != split) | manifest["clip_id"].isin(set(clip_ids))]
    return VideoClipDataset(manifest, results_dir, split, mode=mode, config=config, **kwargs)


def build_loader(dataset: Any, batch_size: int, num_workers: int, shuffle: bool, seed: int,
                 drop_last: bool, distributed: bool):
    """``mofo.runtime.loader.make_loader`` (sampler, workers, collate of the data module)."""
    from mofo.runtime.loader import make_loader

    return make_loader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
                       seed=seed, drop_last=drop_last, distributed=distributed)


def build_train_loader(config: dict, manifest_path: str | Path, results_dir: str | Path,
                       mode: str, stage_cfg: dict, world_size: int, clip_ids: Any = None):
    """The shuffled train-split loader of a training stage (``mode`` pretrain / finetune),
    seeded and sized by the stage's section (``seed``, ``batch_size``, ``num_workers``,
    ``frame_cache_mb``); ``clip_ids`` (None = all): the train clips it may use."""
    seed = int(stage_cfg["seed"])
    dataset = build_dataset(config, manifest_path, results_dir, "train", mode, clip_ids, seed=seed,
                            frame_cache_mb=float(stage_cfg["frame_cache_mb"]))
    return build_loader(dataset, int(stage_cfg["batch_size"]), int(stage_cfg["num_workers"]),
                        shuffle=True, seed=seed, drop_last=True, distributed=world_size > 1)
