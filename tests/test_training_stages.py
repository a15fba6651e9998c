"""Stage entry points end to end on a tiny real frame store, mixup, fine-tuning resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from mofo.bench.synthetic import SyntheticClipDataset
from mofo.config import load_config
from mofo.runtime.distributed import DistContext, RankInfo
from mofo.training import engine
from mofo.training.mixup import VideoMixup
from tests.test_dataset import make_results

TINY = {"size": "demo", "input_size": 32, "num_frames": 8, "sampling_rate": 2, "patch_size": 8,
        "tubelet_size": 2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**extra) -> dict:
    fast = {"epochs": 1, "warmup_epochs": 0, "total_batch": 2, "batch_size": 2, "num_workers": 0,
            "log_interval": 1}
    overrides = {"model": TINY, "pretrain": {**fast, "n_reconstruction_clips": 1},
                 "finetune": fast, "evaluate": {"batch_size": 4, "num_workers": 0},
                 "engine": {"device": "cpu"}}
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value}
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage") / "demo"
    manifest = make_results(root)
    manifest["label"] = manifest["label"] % 3
    path = root / "manifest.csv"
    manifest.to_csv(path, index=False)
    return path, root


def test_pretrain_finetune_evaluate_end_to_end(results, tmp_path):
    from mofo.evaluation import evaluate
    from mofo.training import finetune, pretrain

    manifest, root = results
    cfg = tiny_config(dataset={"demo": {"classes": ["left", "right", "up"]}})
    ckpt = pretrain.run(cfg, manifest, root, "mofo", tmp_path / "pre")
    assert ckpt.name == "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["meta"]["masking"] == "mofo" and any(k.startswith("encoder.") for k in saved["model"])
    assert len(list((tmp_path / "pre" / "reconstructions").glob("*.png"))) == 1
    records = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "end"
    recon = json.loads((tmp_path / "pre" / "validation.json").read_text())
    assert recon["split"] == "validation" and recon["masking"] == "mofo" and recon["n_clips"] > 0
    assert recon["tokens"] == recon["inbox"]["tokens"] + recon["outbox"]["tokens"] > 0
    assert recon["ratio"] == pytest.approx(recon["loss"] / recon["floor"])

    ft = finetune.run(cfg, manifest, root, ckpt, "mca", tmp_path / "ft")
    meta = torch.load(ft, weights_only=True)["meta"]
    assert meta["pretrain_masking"] == "mofo" and meta["finetune_head"] == "mca"
    assert meta["selection"] == {"rule": "last", "epoch": 0, "val_top1": None, "val_loss": None,
                                 "split": None, "epochs_run": 1, "stopped_early": False}
    assert not (tmp_path / "ft" / "metrics.jsonl").read_text().count('"type": "val"')
    assert json.loads((tmp_path / "ft" / "load_report.json").read_text())["loaded"]

    metrics = evaluate.run(cfg, manifest, root, ft, "mca", tmp_path / "ev")
    assert metrics["variant"] == "MOFO†" and metrics["views_per_clip"] == 6
    assert 0.0 <= metrics["top1"] <= 100.0 and metrics["n_clips"] == 1
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert pred["clip_id"].tolist() == ["c4"] and pred["n_views"].tolist() == [6]
    assert (tmp_path / "ev" / "confusion.png").exists()
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["top1"] == metrics["top1"]
    assert metrics["selection"] == meta["selection"]
    with pytest.raises(evaluate.EvaluationError,
                       match=r"was fine-tuned with head 'mca', asked to evaluate 'mean'"):
        evaluate.run(cfg, manifest, root, ft, "mean", tmp_path / "ev2")


def test_finetuning_on_a_share_of_the_labels_uses_and_lists_it(results, tmp_path):
    """label_fraction 0.5 of 4 train clips of one class: two clips drawn from the seed, listed in
    label_subset.csv, and the only ones trained on (1 step a clip; c3 failed to decode and is
    skipped if drawn, as every stage skips it; every label: the 3 decoded clips, 3 steps)."""
    from mofo.data.manifest import label_subset, read_manifest
    from mofo.training import finetune

    manifest_path, root = results
    manifest = read_manifest(manifest_path)
    manifest.loc[manifest["split"] == "train", "label"] = 0
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    cfg = tiny_config(dataset={"demo": {"classes": ["left", "right", "up"]}},
                      finetune={"total_batch": 1, "batch_size": 1})
    steps = {}
    for share in (0.5, 1.0):
        out = tmp_path / f"ft{share}"
        finetune.run(cfg, tmp_path / "manifest.csv", root, None, "mean", out, seed=2,
                     label_fraction=share)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps[share] = len([r for r in records if r["type"] == "step"])
    listed = pd.read_csv(tmp_path / "ft0.5" / "label_subset.csv")
    drawn = label_subset(manifest, 0.5, seed=2)
    assert listed["clip_id"].tolist() == drawn["clip_id"].tolist() and len(listed) == 2
    trained = len(set(listed["clip_id"]) - {"c3"})
    assert steps == {0.5: trained, 1.0: 3}
    assert not (tmp_path / "ft1.0" / "label_subset.csv").exists()
    meta = torch.load(tmp_path / "ft0.5" / "checkpoint.pt", weights_only=True)["meta"]
    assert meta["label_fraction"] == 0.5 and meta["label_subset"] == trained
    big = tiny_config(dataset={"demo": {"classes": ["left", "right", "up"]}},
                      finetune={"total_batch": 4, "batch_size": 4})
    with pytest.raises(ValueError, match="2 labelled train clips, fewer than one step's"):
        finetune.run(big, tmp_path / "manifest.csv", root, None, "mean", tmp_path / "x",
                     label_fraction=0.5)


def test_seeds_change_pretraining_and_the_same_seed_reproduces_it(results, tmp_path):
    """The {seed} wildcard's --seed decides init, loader order, augmentations and masks."""
    from mofo.training import pretrain

    manifest, root = results
    cfg = tiny_config()

    def weights(seed, name):
        ckpt = pretrain.run(cfg, manifest, root, "tube", tmp_path / name, seed=seed, max_steps=2)
        return torch.load(ckpt, weights_only=True)["model"]

    a, again, other = weights(0, "a"), weights(0, "again"), weights(1, "other")
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_mixup_pastes_partner_inbox_inside_the_cut():
    cfg = {"label_smoothing": 0.1, "mixup": 0.0, "cutmix": 1.0, "mixup_prob": 1.0,
           "mixup_switch_prob": 0.5}
    mixer = VideoMixup(cfg, {"label": 4}, (2, 4, 4), 8)
    frames = torch.stack([torch.zeros(3, 4, 32, 32), torch.ones(3, 4, 32, 32)])
    inbox = torch.zeros(2, 32, dtype=torch.bool)
    inbox[1] = True  # partner of clip 0 is clip 1 (flip)
    np.random.seed(0)
    mixed, new_inbox, targets = mixer(frames, inbox, {"label": torch.tensor([0, 1])})
    pasted = mixed[0, 0, 0] == 1.0  # pixels of clip 0 that came from clip 1
    cell_centres = pasted[4::8, 4::8].reshape(-1)  # (4*4,) one per spatial cell
    assert torch.equal(new_inbox[0], cell_centres.repeat(2))
    lam = 1.0 - pasted.float().mean().item()
    assert targets["label"][0, 0].item() == pytest.approx(lam * 0.925 + (1 - lam) * 0.025)
    assert torch.allclose(targets["label"].sum(1), torch.ones(2))


def test_mixup_blend_unions_inbox_and_mixes_every_head():
    cfg = {"label_smoothing": 0.0, "mixup": 0.8, "cutmix": 0.0, "mixup_prob": 1.0,
           "mixup_switch_prob": 0.5}
    mixer = VideoMixup(cfg, {"verb": 3, "noun": 5}, (1, 1, 2), 8)
    inbox = torch.tensor([[True, False], [False, True]])
    frames = torch.randn(2, 3, 2, 8, 16)
    np.random.seed(1)
    mixed, new_inbox, targets = mixer(frames, inbox, {"verb": torch.tensor([0, 1]),
                                                      "noun": torch.tensor([4, 2])})
    assert new_inbox.all()
    lam = targets["verb"][0, 0].item()
    assert targets["noun"][0, 4].item() == pytest.approx(lam)
    assert torch.allclose(mixed[0], lam * frames[0] + (1 - lam) * frames[1], atol=1e-6)


def test_finetune_resume_with_mixup_reproduces_losses(tmp_path):
    from mofo.models.build import build_classifier
    from mofo.training.finetune import finetune_task

    model_cfg = {**TINY, "input_size": 16, "num_frames": 4}
    ft = dict(load_config()["finetune"], epochs=2, warmup_epochs=0.5, batch_size=4,
              accum_steps=1, base_lr=1e-2, log_interval=1, mixup=0.8, cutmix=1.0, seed=0)
    heads = {"label": 4}
    ctx = DistContext(RankInfo(0, 0, 1, "single"), torch.device("cpu"), None, "torch")

    def go(out, max_steps=None):
        torch.manual_seed(0)
        model = build_classifier(model_cfg, 4, pooling="mca", depth=1)
        loader = DataLoader(SyntheticClipDataset(16, model_cfg, global_rng_jitter=0.1),
                            batch_size=4, shuffle=True, drop_last=True,
                            generator=torch.Generator())
        mixer = VideoMixup(ft, heads, (2, 2, 2), 8)
        assert mixer.enabled
        return engine.train(model, loader, finetune_task(heads, mixer, 0.1), stage_cfg=ft,
                            engine_cfg=load_config()["engine"], ctx=ctx, out_dir=out, hash_config={"ft": ft},
                            max_steps=max_steps)

    full = go(tmp_path / "a")
    go(tmp_path / "b", max_steps=3)
    resumed = go(tmp_path / "b")
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)


def test_epic_verb_noun_heads_end_to_end(results, tmp_path):
    from mofo.evaluation import evaluate
    from mofo.training import finetune

    manifest, root = results
    cfg = tiny_config(dataset={"name": "epic100"}, augment={"test_clips": 1, "test_crops": 1})
    ft = finetune.run(cfg, manifest, root, None, "mean", tmp_path / "ft")
    meta = torch.load(ft, weights_only=True)["meta"]
    assert meta["heads"] == {"verb": 97, "noun": 300} and meta["pretrain_masking"] == "none"
    metrics = evaluate.run(cfg, manifest, root, ft, "mean", tmp_path / "ev")
    for key in ("verb_top1", "noun_top5", "action_top1", "action_top5"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["top1"] == metrics["action_top1"]
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert {"verb_pred", "noun_pred", "action_correct"} <= set(pred.columns)
    assert pred["verb_label"].tolist() == [4] and pred["noun_label"].tolist() == [14]
    assert (tmp_path / "ev" / "confusion_noun.png").exists()


def test_action_vocabulary_is_the_sorted_train_pairs():
    from mofo.runtime.data import action_vocabulary

    manifest = pd.DataFrame({
        "split": ["train", "train", "validation", "train", "train", "test"],
        "verb_class": [3, 0, 5, 0, 3, -1],
        "noun_class": [1, 7, 5, 2, 1, -1],
    })
    assert action_vocabulary(manifest) == [(0, 2), (0, 7), (3, 1)]
    assert action_vocabulary(manifest.iloc[::-1]) == [(0, 2), (0, 7), (3, 1)]
    with pytest.raises(ValueError, match="dataset.epic100.classifier"):
        action_vocabulary(manifest[manifest["split"] != "train"])


def test_action_head_targets_and_mixup():
    """One ``action`` head: its targets are the vocabulary index of each clip's (verb, noun),
    mixed like any head; a train pair outside the vocabulary stops with the clip's name."""
    from mofo.models.build import build_classifier
    from mofo.training.finetune import action_lookup, action_targets, finetune_task

    actions = [(0, 0), (0, 2), (1, 1)]
    batch = {"frames": torch.randn(2, 3, 4, 16, 16), "inbox": torch.ones(2, 8, dtype=torch.bool),
             "verb": torch.tensor([1, 0]), "noun": torch.tensor([1, 2]), "clip_id": ["a", "b"]}
    assert action_targets(action_lookup(actions), batch).tolist() == [2, 1]
    ft = {"label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0,
          "mixup_switch_prob": 0.5}
    mixer = VideoMixup(ft, {"action": 3}, (2, 2, 2), 8)
    torch.manual_seed(0)
    model = build_classifier({**TINY, "input_size": 16, "num_frames": 4}, None, depth=1,
                             outputs_by_name={"action": 3})
    np.random.seed(0)
    loss, _ = finetune_task({"action": 3}, mixer, 0.1, actions)(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.head["action"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"clip a has \(verb, noun\) = \(1, 0\)"):
        action_targets(action_lookup(actions), {**batch, "noun": torch.tensor([0, 2])})
    with pytest.raises(ValueError, match="action vocabulary"):
        finetune_task({"action": 3}, None, 0.1)


def test_epic_action_classifier_end_to_end(results, tmp_path):
    """dataset.epic100.classifier 'action': one softmax over the train split's (verb, noun)
    pairs, verb and noun read off its marginals, a validation pair outside the vocabulary
    counted as a wrong action; evaluation keeps the checkpoint's vocabulary."""
    from mofo.evaluation import evaluate
    from mofo.training import finetune

    src, root = results
    table = pd.read_csv(src)  # c3 is not decoded, but its pair is an action class
    pairs = {"c0": (0, 10), "c1": (0, 11), "c2": (0, 11), "c3": (1, 10), "c4": (1, 11)}
    table["verb_class"] = table["clip_id"].map(lambda c: pairs[c][0])
    table["noun_class"] = table["clip_id"].map(lambda c: pairs[c][1])
    table.loc[table["clip_id"] == "c2", "split"] = "validation"  # a pair train shows; c4 not
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    cfg = tiny_config(dataset={"name": "epic100", "epic100": {"classifier": "action",
                                                              "horizontal_flip": False}},
                      augment={"test_clips": 1, "test_crops": 1},
                      finetune={"mixup": 0.8, "cutmix": 1.0})
    ft = finetune.run(cfg, manifest, root, None, "mean", tmp_path / "ft")
    meta = torch.load(ft, weights_only=True)["meta"]
    assert meta["heads"] == {"action": 3} and meta["actions"] == [[0, 10], [0, 11], [1, 10]]

    metrics = evaluate.run(cfg, manifest, root, ft, "mean", tmp_path / "ev")
    assert metrics["n_actions"] == 3 and metrics["n_unseen_actions"] == 1
    assert metrics["verb_n_clips"] == metrics["noun_n_clips"] == 2
    assert metrics["top1"] == metrics["action_top1"] in (0.0, 50.0)
    # top-5 of 3 actions holds c2's pair; c4's pair is no action class: wrong at every k
    assert metrics["top5"] == metrics["action_top5"] == 50.0
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv").set_index("clip_id")
    # the marginals: only the vocabulary's verbs (0, 1) and nouns (10, 11) have mass
    assert set(pred["verb_pred"]) <= {0, 1} and set(pred["noun_pred"]) <= {10, 11}
    assert metrics["verb_top5"] == metrics["noun_top5"] == 100.0
    for name in ("verb", "noun"):
        assert metrics[f"{name}_top1"] == 100.0 * pred[f"{name}_correct"].mean()
    assert pred.loc["c4", "action_label"] == -1 and pred.loc["c4", "action_correct"] == 0
    assert pred.loc["c2", "action_label"] == 1
    assert metrics["action_top1"] == 50.0 * pred.loc["c2", "action_correct"]
    assert (tmp_path / "ev" / "confusion_noun.png").exists()
    # another manifest (the fixture's: other train pairs) does not change the vocabulary
    other = evaluate.run(cfg, src, root, ft, "mean", tmp_path / "ev2")
    assert other["n_actions"] == 3 and other["n_unseen_actions"] == 1


def test_an_unfinished_run_resumes_only_with_the_same_inputs(results, tmp_path, capfd):
    """A stopped pretraining resumes when nothing changed, and starts from step 0 when a box
    file changed; a stopped fine-tuning starts from step 0 when the pretrained checkpoint at
    the same path holds other weights. The log line names what changed."""
    import shutil

    from mofo.training import finetune, pretrain

    manifest, src = results
    root = tmp_path / "demo"
    shutil.copytree(src, root)
    cfg = tiny_config(pretrain={"epochs": 4}, finetune={"epochs": 4})  # 1 step per epoch
    pre = tmp_path / "pre"
    pretrain.run(cfg, manifest, root, "mofo", pre, max_steps=1)
    capfd.readouterr()
    pretrain.run(cfg, manifest, root, "mofo", pre, max_steps=2)
    assert "resuming from" in capfd.readouterr().err

    boxes = sorted((root / "boxes").glob("shard-*.csv"))[0]
    table = pd.read_csv(boxes)
    table["x2"] = table["x2"] - 1
    table.to_csv(boxes, index=False)
    result = pretrain.run(cfg, manifest, root, "mofo", pre, max_steps=3)
    err = capfd.readouterr().err
    assert "resuming from" not in err and f"boxes/{boxes.name}" in err
    assert result.name == "checkpoint-last.pt"
    assert torch.load(result, weights_only=True)["global_step"] == 3

    ckpt = pretrain.run(cfg, manifest, root, "mofo", tmp_path / "pre2")
    finetune.run(cfg, manifest, root, ckpt, "mean", tmp_path / "ft", max_steps=1)
    other = torch.load(ckpt, weights_only=True)
    other["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["model"].items()}
    torch.save(other, ckpt)
    capfd.readouterr()
    finetune.run(cfg, manifest, root, ckpt, "mean", tmp_path / "ft", max_steps=2)
    err = capfd.readouterr().err
    assert "resuming from" not in err and "pretrained" in err


@pytest.mark.slow  # three runs, each starting its 2 loader workers
def test_pretraining_resumes_exactly_on_the_real_data_path(tmp_path, capfd):
    """The real data path -- VideoClipDataset on a frame store with motion boxes (MOFO
    masking), the ShuffleSampler, 2 loader worker processes, per-epoch reseeding -- stopped in
    the middle of an epoch and started again gives the uninterrupted run's losses.

    8 clips in batches of 2 (4 steps per epoch) for 3 epochs; the stop after step 6 is in the
    middle of the second epoch, whose order differs from the first's."""
    from mofo.training import pretrain

    root = tmp_path / "demo"
    manifest = make_results(root, clips_per_shard=4, n_clips=8, failed=())
    manifest["split"] = "train"
    path = root / "manifest.csv"
    manifest.to_csv(path, index=False)
    cfg = tiny_config(pretrain={"epochs": 3, "num_workers": 2})

    def step_losses(out) -> list[tuple[int, float]]:
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in records if r["type"] == "step"]

    pretrain.run(cfg, path, root, "mofo", tmp_path / "full")
    full = step_losses(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, 13))

    stopped = pretrain.run(cfg, path, root, "mofo", tmp_path / "split", max_steps=6)
    assert stopped.name == "checkpoint-last.pt"
    saved = torch.load(stopped, weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 2, 6)
    capfd.readouterr()
    pretrain.run(cfg, path, root, "mofo", tmp_path / "split")
    assert f"resuming from {stopped} at epoch 1, step 6" in capfd.readouterr().err
    resumed = step_losses(tmp_path / "split")
    assert [s for s, _ in resumed] == [s for s, _ in full]
    # Steps 1-6 are the stopped run's records, 7-12 the resumed run's: all equal to the
    # uninterrupted run's (the same process count and threads on the CPU: bit for bit).
    assert [x for _, x in resumed] == pytest.approx([x for _, x in full], abs=1e-6)
    assert len({x for _, x in full}) == len(full)  # the losses do differ from step to step
