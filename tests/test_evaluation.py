"""Evaluation: view averaging, top-k, per-class accuracy, EPIC action, figures, the table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mofo.evaluation import metrics as M
from mofo.evaluation.table import Run, make_table, variant_name
from mofo.viz.figures import confusion_figure, reconstruction_figure


def test_aggregate_views_averages_softmax_per_clip():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    ids, scores, counts = M.aggregate_views(["a", "b", "a", "b"], logits, "softmax")
    assert ids == ["a", "b"] and counts.tolist() == [2, 2]
    def p(x):
        return np.exp(x) / np.exp(x).sum()

    assert np.allclose(scores[0], (p(logits[0]) + p(logits[2])) / 2)
    _, mean_logits, _ = M.aggregate_views(["a", "b", "a", "b"], logits, "logits")
    assert np.allclose(mean_logits[1], [0.5, 1.0])
    with pytest.raises(ValueError, match="softmax"):
        M.aggregate_views(["a"], logits[:1], "max")


def test_topk_and_per_class_on_known_scores():
    scores = np.array([
        [0.9, 0.05, 0.03, 0.02],  # true 0, top1 right
        [0.5, 0.3, 0.1, 0.1],     # true 1, top1 wrong, top2 right
        [0.1, 0.2, 0.3, 0.4],     # true 2, rank 2 -> top1 wrong, top2 right
        [0.1, 0.2, 0.3, 0.4],     # true 3, right
        [0.7, 0.1, 0.1, 0.1],     # unlabelled: ignored
    ])
    labels = np.array([0, 1, 2, 3, -1])
    res = M.classification_metrics(scores, labels, 4, ks=(1, 2))
    assert res["top1"] == pytest.approx(50.0)
    assert res["top2"] == pytest.approx(100.0)
    assert res["per_class_accuracy"] == [100.0, 0.0, 0.0, 100.0]
    assert res["mean_class_accuracy"] == pytest.approx(50.0)
    assert res["n_clips"] == 4 and res["n_unlabelled"] == 1
    conf = res["confusion"]
    assert conf[1, 0] == 1 and conf[2, 3] == 1 and conf.sum() == 4


def test_per_class_nan_for_absent_classes():
    conf = M.confusion_matrix(np.array([0, 0]), np.array([0, 2]), 3)
    acc = M.per_class_accuracy(conf)
    assert acc[0] == 100.0 and np.isnan(acc[1]) and acc[2] == 0.0


def test_action_needs_verb_and_noun_right():
    verb = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    noun = np.array([[0.1, 0.6, 0.3], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    res = M.action_metrics(verb, noun, np.array([0, 0, 1]), np.array([1, 1, 2]), ks=(1, 5))
    # clip 0: both right; clip 1: noun wrong; clip 2: both right
    assert res["action_top1"] == pytest.approx(200 / 3)
    assert res["action_top5"] == pytest.approx(100.0)


# The one-softmax action classifier: 3 actions over 2 verbs x 3 nouns.
ACTIONS = [(0, 0), (0, 2), (1, 1)]


def test_marginals_sum_action_probabilities_per_verb_and_noun():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    verb, noun = M.marginalize_actions(probs, ACTIONS, 2, 3)
    # verb 0 = actions 0 + 1, verb 1 = action 2; noun 0 = action 0, noun 1 = action 2, noun 2
    # = action 1
    np.testing.assert_allclose(verb, [[0.8, 0.2], [0.4, 0.6]])
    np.testing.assert_allclose(noun, [[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    # classes no action uses score 0 (here a third verb and a fourth noun)
    verb, noun = M.marginalize_actions(probs, ACTIONS, 3, 4)
    assert verb[:, 2].tolist() == [0, 0] and noun[:, 3].tolist() == [0, 0]
    with pytest.raises(ValueError, match="3 action classes"):
        M.marginalize_actions(probs[:, :2], ACTIONS, 2, 3)
    with pytest.raises(ValueError, match="2 verbs"):
        M.marginalize_actions(probs, [(0, 0), (0, 2), (2, 1)], 2, 3)


def test_action_classifier_metrics_count_unseen_pairs_as_wrong():
    probs = np.array([[0.5, 0.3, 0.2],   # label (0, 2) = action 1: 2nd -> top-1 wrong
                      [0.1, 0.3, 0.6],   # label (1, 1) = action 2: right
                      [0.2, 0.1, 0.7],   # label (1, 0): no such action -> wrong at every k
                      [0.9, 0.05, 0.05]])  # labels unknown (-1): left out
    verb_labels, noun_labels = np.array([0, 1, 1, -1]), np.array([2, 1, 0, -1])
    assert M.action_labels(verb_labels, noun_labels, ACTIONS).tolist() == [1, 2, 3, -1]
    assert M.action_labels([-1, 0], [1, -1], ACTIONS).tolist() == [-1, -1]
    res = M.vocabulary_action_metrics(probs, verb_labels, noun_labels, ACTIONS, ks=(1, 5))
    assert res["action_top1"] == pytest.approx(100 / 3)
    # top-5 of 3 actions: every action, so every clip whose pair is one of them
    assert res["action_top5"] == pytest.approx(200 / 3)
    assert res["n_unseen_actions"] == 1
    # the unseen clip's verb and noun still come from the marginals: verb 1 (0.7) right,
    # noun 1 (0.7) against label 0 wrong
    verb, noun = M.marginalize_actions(probs, ACTIONS, 2, 3)
    assert M.topk_accuracy(verb, verb_labels, (1,))["top1"] == pytest.approx(100.0)
    assert M.topk_accuracy(noun, noun_labels, (1,))["top1"] == pytest.approx(100 / 3)
    assert M.topk_accuracy(noun, noun_labels, (5,))["top5"] == pytest.approx(100.0)


def test_figures_are_written(tmp_path):
    conf = np.array([[3, 1], [0, 4]])
    path = confusion_figure(conf, tmp_path / "c.png", ["left", "right"])
    assert path.stat().st_size > 1000
    torch.manual_seed(0)
    frames = torch.randn(3, 4, 16, 16)
    mask = torch.zeros(2 * 2 * 2, dtype=torch.bool)
    mask[[0, 3, 5]] = True
    pred = torch.randn(3, 2 * 8 * 8 * 3)
    boxes = np.tile([2.0, 3.0, 10.0, 12.0], (4, 1))
    out = reconstruction_figure(frames, mask, pred, boxes, tmp_path / "r.png", 8, 2)
    assert out.stat().st_size > 1000


def test_reconstruction_keeps_visible_patches():
    from mofo.models.patches import denormalize
    from mofo.viz.figures import reconstruct_clip

    frames = torch.rand(3, 2, 8, 8)
    mask = torch.tensor([True, False, False, False])
    pred = torch.zeros(1, 2 * 4 * 4 * 3)
    masked, recon = reconstruct_clip(frames, mask, pred, 4, 2)
    original = denormalize(frames[None])[0].clamp(0, 1).permute(1, 2, 3, 0).numpy()
    assert np.allclose(recon[:, 4:, :], original[:, 4:, :], atol=1e-6)
    assert np.allclose(masked[:, :4, :4], 0.5)


def write_metrics(path, masking, head, top1, top5, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pretrain_masking": masking, "finetune_head": head,
                                "top1": top1, "top5": top5, **extra}))
    return path


def write_json(path, **values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def seeded_runs(tmp_path, top1s: dict, recon=None, probe=None):
    """Runs of the variants in ``top1s`` ({label: [(masking, head), [top1 per seed]]})."""
    runs = []
    for label, ((masking, head), values) in top1s.items():
        for seed, top1 in enumerate(values):
            d = tmp_path / f"{masking}-{head}" / f"s{seed}"
            runs.append(Run(label, masking, head, seed,
                            metrics=write_metrics(d / "metrics.json", masking, head, top1, 90.0),
                            validation=(write_json(d / "validation.json", ratio=recon[seed],
                                                   inbox={"ratio": 0.9}, outbox={"ratio": 0.5})
                                        if recon and masking != "scratch" else None),
                            probe=(write_json(d / "probe.json", knn_top1=probe[seed],
                                              linear_top1=probe[seed] + 1) if probe else None)))
    return runs


def test_table_mean_std_over_seeds_and_paper_numbers(tmp_path):
    runs = seeded_runs(tmp_path, {"VideoMAE": [("tube", "mean"), [40.0, 42.0, 44.0]],
                                  "MOFO†": [("mofo", "mca"), [60.0, 61.0, 62.0]],
                                  "MOFO*": [("mofo", "mean"), [41.0, 43.0, 42.0]]},
                       recon=[0.5, 0.6, 0.7], probe=[30.0, 40.0, 50.0])
    df = make_table(runs, tmp_path / "table.csv", tmp_path / "seeds.csv", tmp_path / "table.md", "ssv2")
    assert df.columns[:16].tolist() == [
        "variant", "pretrain_masking", "finetune_head", "label_fraction", "n_seeds", "top1_mean",
        "top1_std", "top5_mean", "top5_std", "probe_knn_mean", "probe_knn_std",
        "probe_linear_mean", "probe_linear_std", "probe_attentive_mean", "probe_attentive_std",
        "recon_ratio_mean"]
    row = df.set_index("variant").loc["VideoMAE"]
    assert row["n_seeds"] == 3 and row["top1_mean"] == pytest.approx(42.0)
    assert row["top1_std"] == pytest.approx(2.0)  # sample std (n - 1)
    assert row["recon_ratio_mean"] == pytest.approx(0.6) and row["probe_linear_mean"] == pytest.approx(41.0)
    seeds = pd.read_csv(tmp_path / "seeds.csv")
    assert len(seeds) == 9 and seeds["seed"].tolist()[:3] == [0, 1, 2]
    md = (tmp_path / "table.md").read_text()
    assert "42.0 ± 2.0" in md and "75.5" in md and "70.8" in md
    # +19 points with std ~1-2 over 3 seeds: larger than the spread; MOFO* +0.0: within it.
    assert "MOFO† vs VideoMAE (top-1): +19.0 points, larger than the seed spread" in md
    assert "MOFO* vs VideoMAE (top-1): +0.0 points, within the seed spread" in md


def test_scarce_label_rows_are_judged_against_scratch_on_the_same_share(tmp_path):
    """A variant fine-tuned on 10 % of the labels is compared with Scratch on 10 %, not with the
    full-label VideoMAE; the attentive probe has its column and its verdict against random."""
    runs = seeded_runs(tmp_path / "all", {"VideoMAE": [("tube", "mean"), [40.0, 42.0, 44.0]],
                                          "Scratch": [("scratch", "mean"), [70.0, 71.0, 72.0]]})
    runs += seeded_runs(tmp_path / "l10", {"Scratch 10%": [("scratch", "mean"), [20.0, 21.0, 22.0]],
                                           "VideoMAE 10%": [("tube", "mean"), [30.0, 31.0, 29.0]]})
    for run in runs:
        object.__setattr__(run, "label_fraction", 0.1 if "10%" in run.variant else 1.0)
    probes = [write_json(tmp_path / f"p{s}.json", knn_top1=20.0, linear_top1=20.0,
                         attentive_top1=a) for s, a in enumerate([50.0, 52.0, 54.0])]
    randoms = [write_json(tmp_path / f"r{s}.json", knn_top1=20.0, linear_top1=20.0,
                          attentive_top1=a) for s, a in enumerate([30.0, 31.0, 32.0])]
    runs = [Run(r.variant, r.masking, r.head, r.seed, r.label_fraction, r.metrics,
                probe=probes[r.seed] if r.variant == "VideoMAE" else None) for r in runs]
    runs += [Run("Random init", "random", "", s, probe=randoms[s]) for s in range(3)]
    df = make_table(runs, tmp_path / "t.csv", tmp_path / "s.csv", tmp_path / "t.md", "demo")
    rows = df.set_index("variant")
    assert rows.loc["VideoMAE 10%", "label_fraction"] == pytest.approx(0.1)
    assert rows.loc["VideoMAE", "probe_attentive_mean"] == pytest.approx(52.0)
    assert rows.loc["VideoMAE", "probe_attentive_std"] == pytest.approx(2.0)
    assert math.isnan(rows.loc["Random init", "label_fraction"])
    md = (tmp_path / "t.md").read_text()
    assert "VideoMAE 10% vs Scratch 10% (top-1, 10% of the labels): +9.0 points, larger" in md
    assert "VideoMAE 10% vs VideoMAE" not in md and "Scratch 10% vs" not in md
    assert "VideoMAE vs Random init (attentive probe): +21.0 points, larger" in md
    assert "| VideoMAE 10% | tube | mean | 10% | 3 |" in md
    seeds = pd.read_csv(tmp_path / "s.csv")
    assert seeds.loc[seeds["variant"] == "Scratch 10%", "label_fraction"].tolist() == [0.1] * 3


def test_table_one_seed_says_no_spread_and_scratch_has_no_recon(tmp_path):
    runs = seeded_runs(tmp_path, {"Scratch": [("scratch", "mean"), [30.0]],
                                  "VideoMAE": [("tube", "mean"), [50.0]]}, recon=[0.8])
    df = make_table(runs, tmp_path / "t.csv", tmp_path / "s.csv", tmp_path / "t.md", "demo")
    rows = df.set_index("variant")
    assert math.isnan(rows.loc["Scratch", "recon_ratio_mean"]) and math.isnan(rows.loc["VideoMAE", "top1_std"])
    md = (tmp_path / "t.md").read_text()
    assert "no numbers for 'demo'" in md and "fewer than 2 seeds" in md


def test_table_probe_only_row_and_epic(tmp_path):
    probe = write_json(tmp_path / "random.json", knn_top1=20.0, linear_top1=25.0)
    runs = seeded_runs(tmp_path, {"VideoMAE": [("tube", "mean"), [50.0]]}, probe=[45.0])
    runs.append(Run("Random init", "random", "", 0, probe=probe))
    df = make_table(runs, tmp_path / "t.csv", tmp_path / "s.csv", tmp_path / "t.md", "demo")
    assert math.isnan(df.set_index("variant").loc["Random init", "top1_mean"])
    assert "VideoMAE's encoder, kNN probe: +25.0 points over the randomly initialised encoder" in (
        tmp_path / "t.md").read_text()
    e = write_metrics(tmp_path / "e.json", "mofo", "mca", 30.0, 60.0, verb_top1=50.0,
                      noun_top1=40.0, action_top1=30.0)
    df = make_table([Run("MOFO†", "mofo", "mca", 0, metrics=e)], tmp_path / "e.csv",
                    tmp_path / "es.csv", tmp_path / "e.md", "epic100")
    assert {"verb_top1_mean", "noun_top1_mean", "action_top1_mean"} <= set(df.columns)
    assert "74.2" in (tmp_path / "e.md").read_text()
    assert variant_name("mofo", "mean") == "MOFO*"
    with pytest.raises(FileNotFoundError):
        make_table([Run("x", "tube", "mean", 0, metrics=tmp_path / "missing.json")],
                   tmp_path / "x.csv", tmp_path / "xs.csv", tmp_path / "x.md", "demo")


def test_table_says_which_recipe_batch_and_selection_each_row_ran(tmp_path):
    """The rows carry the fine-tuning as run (total batch, accumulation, lr, selection); a
    checkpoint selected on the split the table reports says so, and a total batch the GPUs
    could not meet is flagged."""
    batch = {"total_batch": 512, "accum_steps": 64, "lr": 1e-3, "exact": True}
    best = {"rule": "best", "split": "validation", "epoch": 7}
    runs = [Run("VideoMAE", "tube", "mean", seed,
                metrics=write_metrics(tmp_path / f"v{seed}.json", "tube", "mean", 40.0, 90.0,
                                      split="validation", batch=batch, selection=best))
            for seed in (0, 1)]
    runs.append(Run("MOFO†", "mofo", "mca", 0, metrics=write_metrics(
        tmp_path / "m.json", "mofo", "mca", 50.0, 90.0, split="validation",
        batch={**batch, "total_batch": 510, "exact": False}, selection={"rule": "last"})))
    df = make_table(runs, tmp_path / "t.csv", tmp_path / "s.csv", tmp_path / "t.md", "ssv2",
                    recipe="published + robust-boxes")
    row = df.set_index("variant").loc["VideoMAE"]
    assert (row["total_batch"], row["accum_steps"], row["lr"]) == ("512", "64", "0.001")
    assert row["selection"] == "best on validation = the reported split"
    assert row["recipe"] == "published + robust-boxes"
    seeds = pd.read_csv(tmp_path / "s.csv")
    assert seeds["selected_epoch"].tolist()[:2] == [7, 7] and set(seeds["recipe"]) == {
        "published + robust-boxes"}
    md = (tmp_path / "t.md").read_text()
    assert "Recipe: published + robust-boxes" in md
    assert ("VideoMAE: total batch 512 (64 accumulation steps), peak lr 0.001, checkpoint: "
            "best on validation = the reported split") in md
    assert "MOFO†: total batch 510 (64 accumulation steps, NOT the configured total)" in md
