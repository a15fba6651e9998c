"""The features stage on a list dataset of real videos, and the kNN / linear / attentive probes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mofo.config import load_config
from mofo.data.decode import decode_shard
from mofo.data.manifest import build_manifest, shard_name
from mofo.evaluation import features, probe
from mofo.formats.featurefile import FeatureTable, read_features
from mofo.runtime.device import device_frames
from tests.videofixtures import make_frames, write_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATTENTIVE = load_config()["probe"]["attentive"]  # the shipped settings (enabled: true)
PROBE_CFG = {"knn_k": 10, "knn_temperature": 0.07, "linear_l2": 1e-3, "linear_max_iter": 200,
             "attentive": {**ATTENTIVE, "enabled": False}}  # kNN and linear only


# ----------------------------------------------------------------- probes on synthetic features
def synthetic(n: int, dim: int, n_classes: int, seed: int, random_labels: bool = False
              ) -> FeatureTable:
    """Each class points in its own direction, at norms from 0.2 to 10, plus small noise.
    ``random_labels``: labels drawn independently of the features."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(n_classes, dim))
    y = rng.integers(0, n_classes, n)
    x = directions[y] * rng.uniform(0.2, 10.0, (n, 1)) + rng.normal(0, 0.05, (n, dim))
    if random_labels:
        y = rng.integers(0, n_classes, n)
    return FeatureTable(np.array([f"c{i}" for i in range(n)]), y.astype(np.int64),
                        np.full(n, "train"), x.astype(np.float32), {})


def test_probes_separate_separable_features():
    train, val = synthetic(300, 32, 4, seed=1), synthetic(200, 32, 4, seed=2)
    m = probe.probe_metrics(train, val, PROBE_CFG)
    assert m["knn_top1"] >= 99.0 and m["linear_top1"] >= 97.0, m
    assert (m["n_train"], m["n_val"], m["feature_dim"], m["n_classes"]) == (300, 200, 32, 4)
    assert m["majority_top1"] < 40.0
    # The linear probe standardises with the train statistics: a per-dimension scale and
    # offset of the features (both splits alike) changes nothing.
    rng = np.random.default_rng(3)
    scale, offset = rng.uniform(0.1, 10.0, 32), rng.normal(0.0, 50.0, 32)
    train_x, train_y = probe.labelled(train)
    val_x, val_y = probe.labelled(val)
    pred = probe.linear_probe(train_x * scale + offset, train_y, val_x * scale + offset, 4,
                              1e-3, 200)
    assert probe.top1(pred, val_y) >= 97.0


def test_probes_sit_at_chance_on_random_labels():
    train = synthetic(300, 32, 4, seed=1, random_labels=True)
    val = synthetic(400, 32, 4, seed=2, random_labels=True)
    m = probe.probe_metrics(train, val, PROBE_CFG)
    # chance is 25 %; 400 clips give a standard deviation of ~2.2 points
    assert 14.0 <= m["knn_top1"] <= 36.0 and 14.0 <= m["linear_top1"] <= 36.0, m


def test_knn_votes_by_weighted_neighbours_and_skips_unknown_labels():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    # the one nearest neighbour (class 1) outweighs two far ones at a low temperature ...
    test_x = torch.tensor([[0.3, 1.0]])
    assert probe.knn_predict(train_x, train_y, test_x, 3, 0.01, 2).tolist() == [1]
    # ... while at a high temperature the votes are near equal and the majority wins
    assert probe.knn_predict(train_x, train_y, test_x, 3, 100.0, 2).tolist() == [0]
    # similarity is the cosine: the direction counts, not the Euclidean distance ...
    pred = probe.knn_predict(torch.tensor([[10.0, 0.0], [0.1, 0.1]]), torch.tensor([0, 1]),
                             torch.tensor([[1.0, 0.05]]), 1, 0.07, 2)
    assert pred.tolist() == [0]
    # ... nor the dot product
    pred = probe.knn_predict(torch.tensor([[10.0, 10.0], [0.1, 0.0]]), torch.tensor([0, 1]),
                             torch.tensor([[1.0, 0.0]]), 1, 0.07, 2)
    assert pred.tolist() == [1]
    table = FeatureTable(np.array(["a", "b"]), np.array([3, -1]), np.array(["train"] * 2),
                         np.ones((2, 2), np.float32), {})
    x, y = probe.labelled(table)
    assert y.tolist() == [3] and x.shape == (1, 2)


def time_order(n: int, seed: int) -> FeatureTable:
    """Tokens on a grid t=4, h=2, w=2 of width 32 made of two fixed vectors A and B (+ noise
    0.1): class 0 = A in the first half of time and B in the second, class 1 = the reverse.
    Every clip holds 8 A and 8 B tokens, so the mean token (``features``) is the same for both
    classes: only the order in time tells them apart."""
    t, h, w, dim = 4, 2, 2, 32
    a, b = np.random.default_rng(99).normal(size=(2, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    early = np.arange(t * h * w) // (h * w) < t // 2  # token order (t, h, w)
    is_a = early[None, :] == (y[:, None] == 0)
    tokens = np.where(is_a[..., None], a, b) + rng.normal(0, 0.1, (n, t * h * w, dim))
    return FeatureTable(np.array([f"c{i}" for i in range(n)]), y.astype(np.int64),
                        np.full(n, "train"), tokens.mean(axis=1).astype(np.float32),
                        {"token_grid": [t, h, w]}, tokens.astype(np.float16))


def test_attentive_probe_sees_the_time_order_that_the_mean_token_loses():
    train, val = time_order(200, seed=1), time_order(400, seed=2)
    m = probe.probe_metrics(train, val, {**PROBE_CFG, "attentive": ATTENTIVE}, seed=0)
    # the mean token carries no class information: chance is 50 % (400 clips: sd 2.5 points)
    assert m["linear_top1"] <= 65.0 and m["knn_top1"] <= 65.0, m
    assert m["attentive_top1"] >= 90.0 and m["seed"] == 0, m
    # deterministic for a seed; the key is absent when the probe is off
    train_t, grid = probe.labelled_tokens(train)
    val_t, _ = probe.labelled_tokens(val)
    runs = [probe.attentive_probe(train_t[:64], probe.labelled(train)[1][:64], val_t[:50], grid,
                                  2, {**ATTENTIVE, "epochs": 3}, seed=5) for _ in range(2)]
    assert torch.equal(*runs) and runs[0].dtype == torch.int64 and runs[0].shape == (50,)
    assert "attentive_top1" not in probe.probe_metrics(
        train, val, {**PROBE_CFG, "attentive": {**ATTENTIVE, "enabled": False}})


def test_attentive_probe_sits_at_chance_on_random_labels():
    """Random labels on tokens of pure noise (N(0, 1), t=4, h=2, w=2, width 32). Noise tokens
    can be memorised: the same probe trained on the validation clips themselves scores ~88 %
    on them, so a leak of validation labels into training would show here."""
    def noise(n: int, seed: int) -> FeatureTable:
        rng = np.random.default_rng(seed)
        tokens, y = rng.normal(size=(n, 16, 32)), rng.integers(0, 2, n)
        return FeatureTable(np.arange(n).astype(str), y, np.full(n, "train"),
                            tokens.mean(axis=1).astype(np.float32), {"token_grid": [4, 2, 2]},
                            tokens.astype(np.float16))

    m = probe.probe_metrics(noise(200, 1), noise(400, 2), {**PROBE_CFG, "attentive": ATTENTIVE})
    # Predictions that do not depend on the validation labels (two classes drawn with p 1/2)
    # are right with p 1/2 per clip whatever they are: 400 clips give a binomial sd of 2.5
    # points, so 50 +- 10 is four standard deviations.
    assert 40.0 <= m["attentive_top1"] <= 60.0, m


def test_attentive_probe_needs_tokens_and_heads_that_divide_the_width():
    train, val = time_order(20, seed=1), time_order(10, seed=2)
    cfg = {**PROBE_CFG, "attentive": ATTENTIVE}
    no_tokens = FeatureTable(val.clip_id, val.label, val.split, val.features,
                             {"split": "validation"})
    with pytest.raises(ValueError, match="no tokens.*probe.attentive.enabled must be true"):
        probe.probe_metrics(train, no_tokens, cfg)
    with pytest.raises(ValueError, match="num_heads 5 must divide the token width D = 32"):
        probe.probe_metrics(train, val, {**PROBE_CFG, "attentive": {**ATTENTIVE, "num_heads": 5}})


# ----------------------------------------------------------------- the features stage
@pytest.fixture(scope="module")
def list_dataset(tmp_path_factory) -> tuple[dict, Path, Path]:
    """Six real mp4 files in a train list (4) and a validation list (2), decoded into frame
    stores as the decode stage does; no motion boxes are made (features need none)."""
    root = tmp_path_factory.mktemp("listdata")
    videos = root / "videos"
    lists = {"train": [], "validation": []}
    for i in range(6):
        path = videos / f"cls{i % 2}" / f"clip {i}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, make_frames(12, 60, 80, seed=i, speed=2 + i))
        lists["train" if i < 4 else "validation"].append(f"cls{i % 2}/clip {i}.mp4 {i % 2}")
    files = {}
    for split, lines in lists.items():
        files[split] = str(root / f"{split}.txt")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    config = load_config(overrides={
        "results_dir": str(root / "results"),
        "dataset": {"name": "list", "list": {"root": str(videos), "files": files}},
        "probe": {"batch_size": 3}})
    results = root / "results" / "list"
    manifest = build_manifest(config)
    results.mkdir(parents=True)
    manifest.to_csv(results / "manifest.csv", index=False)
    for shard, rows in manifest.groupby("shard"):
        decode_shard(rows, results / "frames" / shard_name(int(shard)), config["decode"])
    return config, results / "manifest.csv", results


def test_features_write_one_row_per_clip_of_a_list_dataset(list_dataset, tmp_path):
    config, manifest_path, results = list_dataset
    written = features.run(config, manifest_path, results, "random", tmp_path)
    assert set(written) == {"train", "validation"}
    manifest = pd.read_csv(manifest_path)
    for split, path in written.items():
        assert path == tmp_path / f"{split}.npz"
        table = read_features(path)
        rows = manifest[manifest["split"] == split]
        assert sorted(table.clip_id.tolist()) == sorted(rows["clip_id"].tolist())
        assert len(set(table.clip_id.tolist())) == len(rows)
        expected = dict(zip(rows["clip_id"], rows["label"]))
        assert [expected[c] for c in table.clip_id] == table.label.tolist()
        assert set(table.split.tolist()) == {split}
        assert table.features.shape == (len(rows), 96) and table.features.dtype == np.float32
        assert np.isfinite(table.features).all()
        assert table.meta["encoder"] == "random" and table.meta["split"] == split
    # the random reference is probed like any encoder, the attentive probe included
    cfg = {**PROBE_CFG, "attentive": {**ATTENTIVE, "epochs": 2}}
    metrics = probe.run_probe(written["train"], written["validation"], cfg,
                              tmp_path / "probe" / "metrics.json", seed=3)
    saved = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert saved == metrics and (saved["n_train"], saved["n_val"]) == (4, 2)
    assert saved["feature_dim"] == 96 and 0.0 <= saved["knn_top1"] <= 100.0
    assert 0.0 <= saved["attentive_top1"] <= 100.0 and saved["seed"] == 3


def test_random_reference_is_the_pretrainings_init_for_the_seed(list_dataset, tmp_path):
    from mofo.models.build import build_pretrain_model
    from mofo.runtime.device import seed_everything

    config, manifest_path, results = list_dataset

    def feats(seed: int | None, out: str) -> np.ndarray:
        path = features.run(config, manifest_path, results, "random", tmp_path / out,
                            ("train",), seed=seed)
        return read_features(path["train"]).features

    a, b, c = feats(3, "a"), feats(3, "b"), feats(4, "c")
    assert np.array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3)
    assert np.array_equal(feats(None, "d"), feats(config["seeds"][0], "e"))
    # the weights are those a pretraining with seed 3 starts from (mofo.training.pretrain)
    encoder, meta = features.load_encoder(config, "random", 3)
    seed_everything(3)
    start = build_pretrain_model(config["model"], drop_path=0.1).encoder.state_dict()
    assert meta["seed"] == 3
    assert all(torch.equal(v, start[k]) for k, v in encoder.state_dict().items())


def test_features_of_a_checkpoint_are_its_encoders_mean_token(list_dataset, tmp_path):
    """A pretraining checkpoint's encoder, not a fresh one: the file's row equals the mean
    over all tokens of the checkpoint model's encoder output (after its norm) on the same
    centre view, computed here by hand; with ``probe.attentive.enabled`` (the default) the file
    keeps those tokens too, as float16, and switching it off changes nothing else."""
    from mofo.models.build import build_pretrain_model
    from mofo.runtime import data as data_io

    config, manifest_path, results = list_dataset
    torch.manual_seed(5)
    model = build_pretrain_model(config["model"])
    with torch.no_grad():
        model.encoder.norm.weight.uniform_(0.5, 2.0)  # a norm that is not the identity
        model.encoder.norm.bias.uniform_(-1.0, 1.0)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "meta": {"masking": "tube"}}, ckpt)
    path = features.run(config, manifest_path, results, ckpt, tmp_path / "f", ("validation",))
    table = read_features(path["validation"])
    assert table.meta["encoder"] == "tube"
    view = data_io.build_dataset(config, manifest_path, results, "validation", "test",
                                 num_clips=1, num_crops=1, with_boxes=False)
    model.eval()
    for i in range(len(view)):
        item = view[i]
        with torch.no_grad():
            frames = device_frames(item["frames"][None], torch.device("cpu"))
            want = model.encoder.forward_features(frames).mean(dim=1)[0]
            tokens = model.encoder.forward_features(frames)[0]
        row = table.clip_id.tolist().index(item["clip_id"])
        assert np.allclose(table.features[row], want.numpy(), atol=1e-5)
        assert np.allclose(table.tokens[row].astype(np.float32), tokens.numpy(), rtol=2e-3,
                           atol=2e-3)
    assert table.tokens.shape == (len(view), 64, 96) and table.tokens.dtype == np.float16
    assert table.meta["token_grid"] == [4, 4, 4]
    # off: no tokens in the file (nor read back), the pooled features are the same numbers
    off = {**config, "probe": {**config["probe"],
                               "attentive": {**config["probe"]["attentive"], "enabled": False}}}
    path = features.run(off, manifest_path, results, ckpt, tmp_path / "g", ("validation",))
    without = read_features(path["validation"])
    with np.load(path["validation"]) as stored:
        assert without.tokens is None and "tokens" not in stored.files
    assert np.array_equal(without.features, table.features)


# ----------------------------------------------------------------- the rules
def test_probes_target_runs_features_and_a_probe_per_encoder(tmp_path):
    """`snakemake -n probes` with seeds [0, 3]: features and probe per seed for each
    pretraining and for the random reference, which needs no pretraining."""
    import re

    import yaml

    root = Path(__file__).resolve().parent.parent
    overlay = tmp_path / "paths.yaml"
    overlay.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"), "tracking": {"mlflow": {"enabled": False}},
        "seeds": [0, 3],
        "dataset": {"demo": {"root": str(tmp_path / "demo")}}}))
    from tests.smkwork import run_snakemake

    result = run_snakemake("-n", "probes", "--configfile",
                           str(root / ".test" / "config" / "tiny.yaml"), str(overlay),
                           timeout=600, base=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("Job stats:")[1]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}
    assert counts["features"] == 6 and counts["probe"] == 6 and counts["pretrain"] == 4
    assert "finetune" not in counts
    for encoder in ("tube", "mofo", "random"):
        for seed in (0, 3):
            assert f"probe/{encoder}/s{seed}/metrics.json" in result.stdout
    jobs = [block for block in result.stdout.split("\nrule ") if block.startswith("features:")]
    random_jobs = [job for job in jobs if "masking=random" in job]
    assert len(random_jobs) == 2  # one per seed, and they need no checkpoint
    assert all("pretrain/" not in job for job in random_jobs)
    assert all("pretrain/" in job for job in jobs if job not in random_jobs)
