"""VideoClipDataset and mofo.runtime.loader.make_loader on a tiny real frame store with motion boxes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mofo.config import load_config
from mofo.formats.framestore import FrameStoreError, FrameStoreWriter
from mofo.inputs import dataset as D
from mofo.inputs import sampling
from mofo.masking.grid import inbox_tokens
from mofo.runtime import loader as L

SRC_W, SRC_H = 256, 192  # original video size: boxes are written in these pixels
W, H = 128, 96  # stored frame size
N_FRAMES = 20
NUM_FRAMES, SIZE, PATCH, TUBELET = 8, 32, 8, 2
N_TOKENS = (NUM_FRAMES // TUBELET) * (SIZE // PATCH) ** 2


def stored_box(clip: int, frame: int) -> tuple[int, int, int, int]:
    """Box of the white square in stored pixels: moves right 2 px per frame."""
    x1 = 10 + 4 * clip + 2 * frame
    y1 = 20 + 3 * clip
    return x1, y1, x1 + 30, y1 + 36


def make_results(root: Path, clips_per_shard: int = 3, n_clips: int = 5, failed: tuple[str, ...] = ("c3",)):
    """Frame stores + boxes CSVs for ``n_clips`` clips; ``failed`` clips are left out of the
    store (as decode does), but their boxes are written (they are never asked for)."""
    rows = []
    for k in range(n_clips):
        rows.append({"clip_id": f"c{k}", "video_path": f"v{k}.mp4", "label": k % 3, "verb_class": k, "noun_class": 10 + k,
                         "split": "train" if k < 4 else "validation", "start_frame": -1, "stop_frame": -1, "fps": 12.0,
                         "shard": k // clips_per_shard})
    manifest = pd.DataFrame(rows)
    for shard, part in manifest.groupby("shard"):
        prefix = root / "frames" / f"shard-{shard:04d}"
        box_rows = []
        with FrameStoreWriter(prefix) as writer:
            for clip_id in part["clip_id"]:
                k = int(clip_id[1:])
                frames = np.zeros((N_FRAMES, H, W, 3), np.uint8)
                for f in range(N_FRAMES):
                    x1, y1, x2, y2 = stored_box(k, f)
                    frames[f, y1:y2, x1:x2] = 255
                    box_rows.append((clip_id, f, 2 * x1, 2 * y1, 2 * x2, 2 * y2, True, ""))
                if clip_id in failed:
                    continue
                writer.begin_clip(clip_id, src_height=SRC_H, src_width=SRC_W, fps=12.0)
                writer.add_frames(frames)
                writer.end_clip()
        (root / "boxes").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(box_rows, columns=["clip_id", "frame", "x1", "y1", "x2", "y2", "detected", "source"]).to_csv(
            root / "boxes" / f"shard-{shard:04d}.csv", index=False)
    return manifest


def make_config(**augment) -> dict:
    overrides = {"model": {"input_size": SIZE, "num_frames": NUM_FRAMES, "sampling_rate": 2,
                           "patch_size": PATCH, "tubelet_size": TUBELET}}
    if augment:
        overrides["augment"] = augment
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results") / "demo"
    return make_results(root), root


def unnormalise(clip: torch.Tensor) -> np.ndarray:
    """The clip's pixels ``(T, H, W, 3)``: uint8 as the loader sends them, or undone from the
    ImageNet normalisation (fine-tuning with random erasing, ``engine.uint8_frames: false``)."""
    if clip.dtype == torch.uint8:
        return clip.permute(1, 2, 3, 0).numpy().astype(np.float32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    return ((clip * std + mean) * 255).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)


def assert_boxes_follow_pixels(sample: dict, tol: float):
    frames = unnormalise(sample["frames"])
    for frame, box in zip(frames, sample["boxes"].numpy()):
        ys, xs = np.nonzero(frame.mean(axis=2) > 128)
        if len(xs) == 0:
            assert (box == 0).all()
            continue
        np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=tol)


# ----------------------------------------------------------------------------- items


def test_pretrain_item_shapes_mask_and_boxes(results):
    manifest, root = results
    config = make_config()
    ds = D.VideoClipDataset(manifest, root, "train", "pretrain", config, seed=1)
    assert len(ds) == 3 and ds.n_skipped == 1 and ds.skipped_ids == ["c3"]
    assert list(ds.clips["clip_id"]) == ["c0", "c1", "c2"]
    for item in range(len(ds)):
        s = ds[item]
        assert s["frames"].shape == (3, NUM_FRAMES, SIZE, SIZE) and s["frames"].dtype == torch.uint8
        assert s["boxes"].shape == (NUM_FRAMES, 4) and s["boxes"].dtype == torch.float32
        assert s["inbox"].shape == (N_TOKENS,) and s["inbox"].dtype == torch.bool
        assert s["mask"].shape == (N_TOKENS,) and s["mask"].dtype == torch.bool
        # 0.9 of 16 tubes -> 14 tubes x 4 tubelets, for every clip
        assert int(s["mask"].sum()) == 14 * 4
        assert s["label"].dtype == torch.int64 and int(s["label"]) == item % 3
        assert s["clip_id"] == f"c{item}" and s["index"] == item
        assert "verb" not in s and "view" not in s
        idx = s["frame_indices"].numpy()
        np.testing.assert_array_equal(np.diff(idx), 2)  # dense window, sampling_rate 2
        assert s["inbox"].any()
        np.testing.assert_array_equal(
            s["inbox"].numpy(), inbox_tokens(s["boxes"].numpy(), NUM_FRAMES, SIZE, PATCH, TUBELET))
        # JPEG edges and the resize blur the square's border by about a pixel
        assert_boxes_follow_pixels(s, tol=1.5)


def test_mofo_mask_covers_the_box(results):
    manifest, root = results
    ds = D.VideoClipDataset(manifest, root, "train", "pretrain", make_config(), seed=0)
    for item in range(len(ds)):
        s = ds[item]
        inbox_tubes = s["inbox"].view(NUM_FRAMES // TUBELET, -1).any(0)
        masked_tubes = s["mask"].view(NUM_FRAMES // TUBELET, -1)[0]
        # at least floor(0.75 * in-box tubes) in-box tubes are masked
        assert int((masked_tubes & inbox_tubes).sum()) >= int(0.75 * int(inbox_tubes.sum()))


def test_finetune_boxes_follow_crops_and_flips(results):
    manifest, root = results
    config = make_config(rand_augment="", random_erasing=0.0)
    config["dataset"]["name"] = "epic100"  # flips allowed
    ds = D.VideoClipDataset(manifest, root, "train", "finetune", config, seed=3)
    assert ds.flip and ds.scheme == "segment"
    for epoch in range(4):
        ds.set_epoch(epoch)
        for item in range(len(ds)):
            s = ds[item]
            assert "mask" not in s
            assert int(s["verb"]) == item and int(s["noun"]) == 10 + item
            # random resized crops upscale up to ~3.5x: one stored pixel is a few crop pixels
            assert_boxes_follow_pixels(s, tol=4.0)
            idx = s["frame_indices"].numpy()  # one frame from each of 8 segments of 2.5 frames
            assert ((idx >= np.floor(np.arange(8) * 2.5)) & (idx < np.ceil(np.arange(1, 9) * 2.5))).all()


def test_finetune_with_full_augmentation(results):
    manifest, root = results
    # The VideoMAE recipe, whatever the demo defaults turn down.
    config = make_config(rand_augment="rand-m7-n4-mstd0.5-inc1", random_erasing=0.25,
                         random_resized_crop={"scale": [0.08, 1.0], "ratio": [0.75, 1.3333]})
    ds = D.VideoClipDataset(manifest, root, "train", "finetune", config, seed=0)
    assert not ds.flip and ds.rand_augment is not None  # demo: left/right is the label
    for item in range(len(ds)):
        s = ds[item]
        assert s["frames"].shape == (3, NUM_FRAMES, SIZE, SIZE)
        assert torch.isfinite(s["frames"]).all()
        b = s["boxes"].numpy()
        assert ((b >= 0) & (b <= SIZE)).all()


def test_test_views_enumerate_clips_and_crops(results):
    manifest, root = results
    config = make_config()
    ds = D.VideoClipDataset(manifest, root, "train", "test", config)
    assert len(ds) == 3 * 2 * 3
    seen = set()
    for item in range(len(ds)):
        s = ds[item]
        seen.add((s["index"], s["view"]))
        clip_idx, _crop_idx = divmod(s["view"], 3)
        expected = sampling.test_views(N_FRAMES, NUM_FRAMES, 2, 2, "segment")[clip_idx]
        np.testing.assert_array_equal(s["frame_indices"].numpy(), expected)
        assert_boxes_follow_pixels(s, tol=1.5)
    assert seen == {(i, v) for i in range(3) for v in range(6)}
    # the left and right crops of one view differ (the frame is 4:3)
    assert not torch.equal(ds[0]["frames"], ds[2]["frames"])
    single = D.VideoClipDataset(manifest, root, "train", "test", config, test_view=(1, 2))
    assert len(single) == 3
    torch.testing.assert_close(single[0]["frames"], ds[5]["frames"])
    assert single[0]["view"] == 5
    centre = D.VideoClipDataset(manifest, root, "train", "test", config, test_view=(0, 0), num_clips=1, num_crops=1)
    np.testing.assert_array_equal(centre[0]["frame_indices"].numpy(), sampling.segment_indices(N_FRAMES, 8, mode="test"))


def test_boxes_are_scaled_from_source_pixels(results):
    manifest, root = results
    ds = D.VideoClipDataset(manifest, root, "train", "pretrain", make_config())
    indices = np.array([0, 5, 5, 19])
    frames, boxes = ds.load(1, indices)
    assert frames.shape == (4, H, W, 3)
    np.testing.assert_allclose(boxes, [stored_box(1, f) for f in indices])


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_samples_other_epoch_other_samples(results):
    manifest, root = results
    config = make_config()
    a = D.VideoClipDataset(manifest, root, "train", "finetune", config, seed=5)
    b = D.VideoClipDataset(manifest, root, "train", "finetune", config, seed=5)
    for item in range(len(a)):
        sa, sb = a[item], b[item]
        for key in ("frames", "boxes", "inbox", "frame_indices"):
            assert torch.equal(sa[key], sb[key]), key
    p = D.VideoClipDataset(manifest, root, "train", "pretrain", config, seed=5)
    first = [p[i]["mask"] for i in range(len(p))]
    p.set_epoch(1)
    assert p.epoch == 1
    assert any(not torch.equal(m, p[i]["mask"]) for i, m in enumerate(first))
    c = D.VideoClipDataset(manifest, root, "train", "finetune", config, seed=6)
    assert any(not torch.equal(a[i]["frames"], c[i]["frames"]) for i in range(len(a)))


def test_the_frame_cache_changes_no_sample(results):
    """Two epochs of pretraining and fine-tuning samples with the decoded frames kept in
    memory equal those decoded afresh at every read."""
    manifest, root = results
    config = make_config()
    for mode in ("pretrain", "finetune"):
        plain = D.VideoClipDataset(manifest, root, "train", mode, config, seed=3)
        cached = D.VideoClipDataset(manifest, root, "train", mode, config, seed=3,
                                    frame_cache_mb=64)
        for epoch in (0, 1):
            plain.set_epoch(epoch)
            cached.set_epoch(epoch)
            for item in range(len(plain)):
                a, b = plain[item], cached[item]
                for key in ("frames", "boxes", "inbox", "frame_indices"):
                    assert torch.equal(a[key], b[key]), (mode, epoch, item, key)
        assert len(cached._frame_cache) > 0 and len(plain._frame_cache) == 0


def _epochs(loader, epochs):
    out = []
    for epoch in epochs:
        L.set_loader_epoch(loader, epoch)
        batches = list(loader)
        out.append((torch.cat([b["frames"] for b in batches]), torch.cat([b["mask"] for b in batches]),
                    [c for b in batches for c in b["clip_id"]]))
    return out


def test_loader_with_two_workers_matches_single_process(results):
    manifest, root = results
    config = make_config()
    ds = D.VideoClipDataset(manifest, root, "train", "pretrain", config, seed=2)
    serial = _epochs(L.make_loader(ds, 2, 0, shuffle=True, seed=2), [0, 1])
    ds2 = D.VideoClipDataset(manifest, root, "train", "pretrain", config, seed=2)
    loader = L.make_loader(ds2, 2, 2, shuffle=True, seed=2)
    assert loader.persistent_workers and loader.worker_init_fn is L.worker_init_fn
    parallel = _epochs(loader, [0, 1])
    for (fa, ma, ia), (fb, mb, ib) in zip(serial, parallel):
        assert ia == ib
        assert torch.equal(fa, fb) and torch.equal(ma, mb)
        assert fa.shape == (3, 3, NUM_FRAMES, SIZE, SIZE)
    # epoch 1 reached the persistent workers: other order or other augmentation
    assert serial[0][2] != serial[1][2] or not torch.equal(serial[0][0], serial[1][0])


def test_shuffle_sampler_is_a_permutation_per_epoch():
    sampler = L.ShuffleSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == list(sampler)
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != first


# ----------------------------------------------------------------------------- rules and errors


def test_build_test_views():
    views = D.build_test_views(2, 2, 3)
    assert views.shape == (12, 3)
    np.testing.assert_array_equal(views[:6, 0], 0)
    np.testing.assert_array_equal(views[:6, 1:], [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])


def test_flip_and_sampling_rules():
    config = make_config()
    assert not D.flip_allowed(config)
    config["dataset"]["name"] = "ssv2"
    assert not D.flip_allowed(config) and D.sampling_scheme(config, "finetune") == "segment"
    config["dataset"]["name"] = "epic100"
    assert D.flip_allowed(config)  # the default, dataset.epic100.horizontal_flip: true
    config["dataset"]["epic100"]["horizontal_flip"] = False  # the MOFO authors' recipe
    assert not D.flip_allowed(config)
    config["dataset"]["name"] = "list"
    config["dataset"]["list"]["horizontal_flip"] = False
    assert not D.flip_allowed(config) and D.sampling_scheme(config, "finetune") == "dense"
    assert D.sampling_scheme(config, "pretrain") == "dense"


def test_skipped_clips_are_logged_once(results, caplog):
    manifest, root = results
    with caplog.at_level(logging.WARNING, logger="mofo.inputs.dataset"):
        D.VideoClipDataset(manifest, root, "train", "finetune", make_config())
    messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(messages) == 1 and "skipped 1 of 4" in messages[0] and "c3" in messages[0]


def test_missing_boxes_file_names_the_file(tmp_path):
    root = tmp_path / "demo"
    manifest = make_results(root, failed=())
    (root / "boxes" / "shard-0001.csv").unlink()
    ds = D.VideoClipDataset(manifest, root, "validation", "pretrain", make_config())
    with pytest.raises(D.DatasetError, match="shard-0001.csv"):
        ds[0]


def test_bad_arguments(results):
    manifest, root = results
    config = make_config()
    with pytest.raises(ValueError, match="mode"):
        D.VideoClipDataset(manifest, root, "train", "eval", config)
    with pytest.raises(ValueError, match="test_view"):
        D.VideoClipDataset(manifest, root, "train", "test", config, test_view=(2, 0))
    with pytest.raises(D.DatasetError, match="split 'test'"):
        D.VideoClipDataset(manifest, root, "test", "test", config)
    missing = r"frame store index not found: .*frames/shard-0009\.index\.csv"
    with pytest.raises(FrameStoreError, match=missing):
        D.VideoClipDataset(manifest.assign(shard=9), root, "train", "test", config)


def test_uint8_clips_normalised_on_the_device_equal_the_loaders_normalisation(results):
    """``engine.uint8_frames``: the same item, sent as uint8 and normalised by to_device, is
    bit-for-bit the clip the loader normalises itself (on a CPU; on a GPU within float
    rounding), and fine-tuning with random erasing keeps normalising in the loader."""
    from mofo.runtime.device import to_device

    manifest, root = results
    cpu = torch.device("cpu")
    for mode in ("pretrain", "finetune", "test"):
        config = make_config(random_erasing=0.0)
        as_uint8 = D.VideoClipDataset(manifest, root, "train", mode, config, seed=1)
        config["engine"]["uint8_frames"] = False
        as_float = D.VideoClipDataset(manifest, root, "train", mode, config, seed=1)
        for i in range(len(as_uint8)):
            sent = as_uint8[i]
            assert sent["frames"].dtype == torch.uint8, mode
            batch = to_device({k: v for k, v in sent.items() if k != "clip_id"}, cpu)
            assert torch.equal(batch["frames"], as_float[i]["frames"]), (mode, i)
    erasing = D.VideoClipDataset(manifest, root, "train", "finetune",
                                 make_config(random_erasing=1.0), seed=1)
    assert erasing[0]["frames"].dtype == torch.float32
