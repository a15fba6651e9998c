"""Fine-tuning on a share of the labels (issue 27): the subset of the train split, the
fine-tuning names that carry it through the DAG, and the rerun trigger."""

import numpy as np
import pandas as pd
import pytest

from mofo.config import load_config
from mofo.data.manifest import label_subset
from mofo.provenance import finetuning_name, finetuning_spec, stage_hash


def manifest(seed: int = 0) -> pd.DataFrame:
    """Two splits, 4 classes of unequal size (40, 20, 10, 3 train clips), unlabelled rows."""
    rows = [{"clip_id": f"c{c}-{i:03d}", "split": "train", "label": c}
            for c, n in enumerate([40, 20, 10, 3]) for i in range(n)]
    rows += [{"clip_id": f"v{c}-{i}", "split": "validation", "label": c}
             for c in range(4) for i in range(5)]
    rows += [{"clip_id": f"u{i}", "split": "train", "label": -1} for i in range(7)]
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # row order varies


def test_subset_is_stratified_by_class():
    subset = label_subset(manifest(), 0.25, seed=0)
    assert subset.groupby("label").size().tolist() == [10, 5, 2, 1]  # round(n/4), at least 1
    assert (subset["split"] == "train").all() and (subset["label"] >= 0).all()


def test_subset_is_the_seeds_and_not_the_row_orders():
    a, b = label_subset(manifest(0), 0.1, seed=3), label_subset(manifest(1), 0.1, seed=3)
    assert a["clip_id"].tolist() == b["clip_id"].tolist()
    other = label_subset(manifest(0), 0.1, seed=4)
    assert a["clip_id"].tolist() != other["clip_id"].tolist()


def test_subset_never_draws_validation_clips():
    for seed in range(5):
        ids = set(label_subset(manifest(), 0.5, seed)["clip_id"])
        validation = set(manifest().query("split == 'validation'")["clip_id"])
        assert ids and not ids & validation


def test_every_label_is_every_labelled_train_clip():
    full = label_subset(manifest(), 1.0, seed=0)
    assert len(full) == 73 and set(full["clip_id"]) == set(
        manifest().query("split == 'train' and label >= 0")["clip_id"])
    with pytest.raises(ValueError, match="label_fraction"):
        label_subset(manifest(), 0.0, seed=0)


def test_each_seed_draws_uniformly_within_a_class():
    """Over many seeds every clip of a class is drawn about equally often (no bias to the
    first ids): 400 draws of 10 of 40 clips, each clip expected 100 times."""
    counts = pd.Series(0, index=[f"c0-{i:03d}" for i in range(40)])
    for seed in range(400):
        drawn = label_subset(manifest(), 0.25, seed)
        counts[drawn.loc[drawn["label"] == 0, "clip_id"]] += 1
    assert counts.sum() == 4000 and counts.min() > 60 and counts.max() < 140


def test_finetuning_names_carry_the_share():
    assert finetuning_name("mean") == "mean" and finetuning_name("mean", 1.0) == "mean"
    assert finetuning_name("mca", 0.1) == "mca_l10"
    assert finetuning_spec("mca_l10") == ("mca", 0.1) and finetuning_spec("mean") == ("mean", None)
    for bad in (0.125, 1.5, 0.0):
        with pytest.raises(ValueError, match="label_fraction"):
            finetuning_name("mean", bad)
    with pytest.raises(ValueError, match="fine-tuning name"):
        finetuning_spec("mean_l0")


def test_every_label_reruns_nothing_and_a_share_reruns_fine_tuning():
    """label_fraction 1.0 (the default) leaves fine-tuning's rerun trigger as it was before
    the key existed; any other value changes it."""
    config = load_config([])
    before = {**config, "finetune": {k: v for k, v in config["finetune"].items()
                                     if k != "label_fraction"}}
    assert stage_hash(config, "finetune") == stage_hash(before, "finetune")
    scarce = {**config, "finetune": {**config["finetune"], "label_fraction": 0.25}}
    assert stage_hash(scarce, "finetune") != stage_hash(config, "finetune")
    assert np.isclose(config["finetune"]["label_fraction"], 1.0)
