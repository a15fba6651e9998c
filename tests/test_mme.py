"""MME's target (issue 11): trajectories from flow, their crop, the HOG target, the loss, the
pretraining names, and a tiny pretraining with target mme end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mofo.config import load_config
from mofo.formats.trajfile import (
    ClipTrajectories,
    TrajectoryFile,
    dequantize,
    quantize,
    token_trajectories,
)
from mofo.models.hog import hog_cells, hog_token_targets
from mofo.motion.trajectories import compute_trajectories, trajectories_shard, write_trajectories
from mofo.provenance import pretraining_spec, stage_hash
from mofo.training.losses import mme_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BOUND = 20.0
QUANTUM = BOUND / 127
SHIFT = 6 * QUANTUM  # flow px per frame in the dataset tests: exactly representable in int8


def translation(n_flows: int, h: int, w: int, u: float, v: float) -> np.ndarray:
    flow = np.zeros((n_flows, h, w, 2), np.float32)
    flow[..., 0], flow[..., 1] = u, v
    return flow


# --------------------------------------------------------------------------- trajectories


def test_constant_translation_gives_constant_displacements(tmp_path):
    flow = translation(7, 48, 64, 1.5, -0.75)
    disp, steps = compute_trajectories(flow, 4, 8, BOUND)
    assert disp.shape == (8, 4, 6, 8, 2) and steps.shape == (8, 6, 8)
    valid = np.arange(4)[None, :, None, None] < steps[:, None]
    assert valid.sum() > 0.6 * valid.size
    np.testing.assert_allclose(disp[valid], np.broadcast_to([1.5, -0.75], disp[valid].shape),
                               atol=1e-5)
    # on disk: int8 in steps of bound / 127, read back within half a step
    report = write_trajectories([("clip", flow.astype(np.float16))], tmp_path / "t.npz",
                                {"steps": 4, "spacing": 8}, BOUND)
    assert report["clips"] == 1
    read = TrajectoryFile(tmp_path / "t.npz").clip("clip")
    assert read.grid_hw == (48, 64) and read.spacing == 8
    np.testing.assert_array_equal(read.valid, valid)
    np.testing.assert_allclose(read.disp, disp, atol=QUANTUM / 2 + 1e-6)


def test_a_shard_s_trajectories_are_those_of_its_stored_flow(tmp_path):
    """The trajectories job computes the flow again from the frames (it must not read the
    temporary flow file): its file equals, array for array, the trajectories of the flow file
    the flow job writes, and a clip whose frames cannot be read is left out of both."""
    from mofo.config import load_config
    from mofo.formats.framestore import FrameStoreWriter
    from mofo.motion.flow import flow_shard
    from tests.test_flow import translating_clip

    prefix = tmp_path / "frames" / "shard-0000"
    with FrameStoreWriter(prefix) as writer:
        for i, clip_id in enumerate(("a", "b", "c")):
            writer.begin_clip(clip_id, src_height=48, src_width=64, fps=12.0)
            writer.add_frames(translating_clip(6, dx=i + 1, dy=1 - i))
            writer.end_clip()
    index = pd.read_csv(prefix.with_suffix(".index.csv"), dtype={"clip_id": str})
    first = index[index["clip_id"] == "c"].iloc[0]  # clip c's first JPEG -> zeros
    pack = bytearray(prefix.with_suffix(".jpgpack").read_bytes())
    pack[first["offset"]:first["offset"] + first["nbytes"]] = bytes(int(first["nbytes"]))
    prefix.with_suffix(".jpgpack").write_bytes(bytes(pack))
    flow_cfg = dict(load_config()["optical_flow"], method="dis", scale=1.0)
    traj_cfg = {"steps": 3, "spacing": 8}
    assert flow_shard(prefix, tmp_path / "flow.npz", flow_cfg)["failed"] == ["c"]
    with np.load(tmp_path / "flow.npz") as flows:
        write_trajectories(((c, flows[c]) for c in flows.files), tmp_path / "from_file.npz",
                           traj_cfg, BOUND)
    report = trajectories_shard(prefix, tmp_path / "from_frames.npz", traj_cfg, flow_cfg)
    assert report["clips"] == 2 and report["failed"] == ["c"]
    with np.load(tmp_path / "from_file.npz") as a, np.load(tmp_path / "from_frames.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    moved = TrajectoryFile(tmp_path / "from_frames.npz").clip("a")
    assert moved.valid.any() and np.abs(moved.disp[moved.valid]).max() > 0


def test_quantisation_scale_is_bound_over_127():
    q = quantize(np.array([BOUND, -BOUND, 30.0, QUANTUM * 3]), BOUND)
    assert q.dtype == np.int8 and q.tolist() == [127, -127, 127, 3]
    np.testing.assert_allclose(dequantize(q, BOUND), [BOUND, -BOUND, BOUND, QUANTUM * 3], rtol=1e-6)


def test_points_leaving_the_frame_are_invalid_from_then_on():
    w, u, steps_l, n_flows = 32, 5.0, 4, 6
    disp, steps = compute_trajectories(translation(n_flows, 16, w, u, 0.0), steps_l, 8, BOUND)
    xs = (np.arange(w // 8) + 0.5) * 8  # 4, 12, 20, 28
    for s in range(n_flows + 1):
        for j, x in enumerate(xs):
            inside = [x + u * (k + 1) < w and s + k < n_flows for k in range(steps_l)]
            expected = int(np.argmin(inside)) if not all(inside) else steps_l  # first exit
            assert steps[s, :, j].tolist() == [expected] * 2, (s, j)
            assert (disp[s, expected:, :, j] == 0).all()  # nothing stored after the exit
            assert (disp[s, :expected, :, j, 0] == u).all()
    # a point that re-enters is still invalid: a flow out, then back in
    flow = translation(3, 16, 16, 0.0, 0.0)
    flow[0, ..., 0], flow[1, ..., 0] = 10.0, -10.0
    _, steps = compute_trajectories(flow, 3, 8, BOUND)
    assert steps[0, 0].tolist() == [3, 0]  # x = 12 -> 22 (out) -> 12 (back): 0 valid steps


def clip_traj(flow: np.ndarray, steps: int = 2, spacing: int = 8) -> ClipTrajectories:
    disp, n = compute_trajectories(flow, steps, spacing, BOUND)
    return ClipTrajectories(disp, np.arange(steps)[None, :, None, None] < n[:, None],
                            flow.shape[1:3], spacing)


def test_a_resize_scales_the_displacements_and_the_crop_picks_the_region():
    # flow grid at half the frame size (1 flow px = 2 frame px); the left half moves right
    # 2 flow px per frame, the right half down 3.
    flow = translation(5, 48, 64, 2.0, 0.0)
    flow[:, :, 32:] = (0.0, 3.0)
    traj = clip_traj(flow)
    starts = np.array([0, 2])
    left, valid = token_trajectories(traj, starts, (96, 128), (0, 0, 64, 96), 32, 8, 4)
    assert left.shape == (2 * 16, 4, 2, 2) and valid.shape == (32, 4, 2) and valid.all()
    # 4 frame px per step; the 64 x 96 crop resized to 32 x 32: x / 2, y / 3
    np.testing.assert_allclose(left, np.broadcast_to([2.0, 0.0], left.shape))
    half, valid_half = token_trajectories(traj, starts, (96, 128), (0, 0, 32, 48), 32, 8, 4)
    assert valid_half.all()
    np.testing.assert_allclose(half, np.broadcast_to([4.0, 0.0], half.shape))  # a 2x zoom
    right, valid_right = token_trajectories(traj, starts, (96, 128), (64, 32, 64, 64), 32, 8, 4)
    np.testing.assert_allclose(right[valid_right],
                               np.broadcast_to([0.0, 3.0], right[valid_right].shape))
    # the bottom row of points (flow y 44 -> 47 -> 50) leaves the 48-px grid at its 2nd step:
    # in token order (t, h, w) with the cells row-major, that is the last token row
    grid = valid_right.reshape(2, 4, 4, 2, 2, 2)  # (t, h, w, cell y, cell x, step)
    assert grid[..., 0].all() and grid[:, :3].all() and not grid[:, 3, ..., 1].any()


# --------------------------------------------------------------------------- HOG


def test_hog_cells_match_scikit_image():
    from skimage import feature  # the dev extra (pyproject.toml): a missing one is an error
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(3, 44, 52)).astype(np.float64) / 255  # 5 x 6 full cells
    image[:, 10:30, 20:24] = 0.9  # some straight edges as well as noise
    mine = hog_cells(torch.from_numpy(image)[None].float(), 8, 9)[0].double().numpy()
    assert mine.shape == (3, 5, 6, 9)
    for c in range(3):
        ref = feature.hog(image[c], orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1),
                          block_norm="L1", feature_vector=False)[:, :, 0, 0]  # (5, 6, 9)
        ours = mine[c] / (mine[c].sum(-1, keepdims=True) + 1e-5)  # the same L1 step
        assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()
    # the scale: a cell's bins add up to its mean central-difference gradient magnitude
    g_row, g_col = np.zeros_like(image), np.zeros_like(image)
    g_row[:, 1:-1] = image[:, 2:] - image[:, :-2]
    g_col[:, :, 1:-1] = image[:, :, 2:] - image[:, :, :-2]
    magnitude = np.hypot(g_row, g_col)[:, :40, :48].reshape(3, 5, 8, 6, 8).mean(axis=(2, 4))
    np.testing.assert_allclose(mine.sum(-1), magnitude, rtol=1e-5)


def test_hog_token_targets_take_each_tubelets_first_frame_in_token_order():
    rng = np.random.default_rng(1)
    clip = torch.from_numpy(rng.random((2, 3, 4, 16, 16))).float()
    out = hog_token_targets(clip, patch_size=8, tubelet_size=2, cell=4, orientations=9)
    assert out.shape == (2, 2 * 2 * 2, 4 * 3 * 9)
    for b in range(2):
        for ti in range(2):
            cells = hog_cells(clip[b, :, 2 * ti][None], 4, 9)[0]  # (3, 4, 4, 9)
            for hi in range(2):
                for wi in range(2):
                    block = cells[:, 2 * hi: 2 * hi + 2, 2 * wi: 2 * wi + 2]  # (C, k, k, bins)
                    expected = block.permute(1, 2, 0, 3).reshape(-1)
                    torch.testing.assert_close(out[b, (ti * 2 + hi) * 2 + wi], expected)


# --------------------------------------------------------------------------- loss


def loss_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, p, steps, patch = 2, 32, 1, 2, 8
    frames = torch.randn(b, 3, 4, 32, 32, generator=g)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, ::2] = True  # 16 masked tokens per clip: w = 0 and w = 2
    traj = torch.randn(b, n, p, steps, 2, generator=g) * 3
    valid = torch.rand(b, n, p, steps, generator=g) > 0.3
    valid[0, 0, 0, 0] = False  # a masked, invalid point (token 0 is masked)
    return frames, mask, traj, valid, patch


def exact_prediction(frames, mask, traj, patch):
    from mofo.models.patches import denormalize

    b = mask.shape[0]
    target = (traj[mask].reshape(b, -1, *traj.shape[2:]) / patch).clamp(-1, 1)
    hog = hog_token_targets(denormalize(frames), patch, 2, 8, 9)[mask].reshape(b, -1, 27)
    return {"trajectory": target.reshape(b, target.shape[1], -1), "hog": hog}


def test_mme_loss_ignores_invalid_points_and_visible_tokens():
    frames, mask, traj, valid, patch = loss_inputs()
    pred = exact_prediction(frames, mask, traj, patch)

    def loss(t=traj, v=valid, f=frames, p=pred):
        return mme_loss(p, f, mask, t, v, patch, 2, 8, 9)

    total, parts = loss()
    assert float(total) == pytest.approx(0.0, abs=1e-10)
    assert set(parts) == {"loss_trajectory", "loss_hog"}
    changed = traj.clone()
    changed[~valid] += 50.0  # invalid points, masked or not
    changed[:, 1::2] += 50.0  # visible tokens
    assert float(loss(t=changed)[0]) == pytest.approx(0.0, abs=1e-10)
    visible_pixels = frames.clone()
    visible_pixels[:, :, :, 2:6, 10:14] += 3.0  # inside token (0, 0, 1): visible
    assert float(loss(f=visible_pixels)[0]) == pytest.approx(0.0, abs=1e-10)
    hidden_pixels = frames.clone()
    hidden_pixels[:, :, :, 2:6, 2:6] += 3.0  # inside token 0: masked
    assert float(loss(f=hidden_pixels)[1]["loss_hog"]) > 1e-6
    moved = traj.clone()
    idx = valid[0, 2].nonzero()[0]  # a valid point of masked token 2
    moved[0, 2, idx[0], idx[1]] += 1.0
    traj_loss = float(loss(t=moved)[1]["loss_trajectory"])
    # one valid value of the mean changes by 1/8 (patch units): its square over the count
    n_valid = int(valid[mask].sum()) * 2
    assert traj_loss == pytest.approx((1.0 / patch) ** 2 * 2 / n_valid, rel=1e-4)
    all_invalid = torch.zeros_like(valid)
    assert float(loss(v=all_invalid)[1]["loss_trajectory"]) == 0.0


# --------------------------------------------------------------------------- names, DAG


def test_pretraining_names_give_strategy_and_target():
    assert pretraining_spec("tube") == ("tube", "pixels")
    assert pretraining_spec("mofo_mme") == ("mofo", "mme")
    for bad in ("tube_pixels", "tube_hog", "Tube", "tube_mme_x", "_mme", ""):
        with pytest.raises(ValueError, match="expected <strategy>"):
            pretraining_spec(bad)
    from mofo.training.pretrain import stage_config

    cfg = load_config()
    out = stage_config(cfg, "tube_mme")
    assert out["masking"]["strategy"] == "tube" and out["pretrain"]["target"] == "mme"
    with pytest.raises(ValueError, match="unknown masking strategy 'blob'"):
        stage_config(cfg, "blob_mme")


def test_trajectory_settings_rerun_only_trajectories_and_mme_pretraining():
    cfg = load_config()
    other = load_config(overrides={"trajectories": {"steps": 2}, "pretrain": {"mme": {"cell": 4}}})
    assert stage_hash(cfg, "pretrain") == stage_hash(other, "pretrain")
    assert stage_hash(cfg, "pretrain_mme") != stage_hash(other, "pretrain_mme")
    assert stage_hash(cfg, "trajectories") != stage_hash(other, "trajectories")
    for stage in ("optical_flow", "motion_map", "motion_boxes", "finetune"):
        assert stage_hash(cfg, stage) == stage_hash(other, stage)


def test_mme_model_has_two_heads_and_the_pixel_model_is_unchanged():
    from mofo.models.build import build_pretrain_model

    model_cfg = load_config()["model"]
    pixels = build_pretrain_model(model_cfg)
    mme = build_pretrain_model(model_cfg, mme_dims=(16, 27))
    assert "decoder.head.weight" in pixels.state_dict()
    assert {"decoder.traj_head.weight", "decoder.hog_head.weight"} <= set(mme.state_dict())
    assert "decoder.head.weight" not in mme.state_dict()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :48] = True
    out = mme(torch.randn(2, 3, 8, 32, 32), mask)
    assert out["trajectory"].shape == (2, 48, 16) and out["hog"].shape == (2, 48, 27)
    assert out["trajectory"].abs().max() <= 1 and out["hog"].min() >= 0


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mme_results(tmp_path_factory):
    """The dataset tests' frame store, with flow (a known translation) and trajectories."""
    from tests.test_dataset import N_FRAMES, H, W, make_results

    root = tmp_path_factory.mktemp("mme") / "demo"
    manifest = make_results(root)
    manifest["label"] = manifest["label"] % 3
    manifest.to_csv(root / "manifest.csv", index=False)
    for shard in sorted(manifest["shard"].unique()):
        ids = manifest.loc[manifest["shard"] == shard, "clip_id"]
        # flow on a half-size grid, to the right by 6 int8 steps (exact on disk) per frame
        flows = {c: translation(N_FRAMES - 1, H // 2, W // 2, SHIFT, 0.0)
                 for c in ids if c != "c3"}
        write_trajectories(flows.items(), root / "trajectories" / f"shard-{shard:04d}.npz",
                           {"steps": 2, "spacing": 8}, BOUND)
    return root / "manifest.csv", root


def tiny_mme_config(**pretrain):
    from tests.test_training_stages import tiny_config

    return tiny_config(pretrain={"target": "mme", "mme": {"cell": 4, "orientations": 9},
                                 **pretrain}, trajectories={"steps": 2, "spacing": 8})


def test_the_dataset_delivers_trajectories_scaled_with_the_crop(mme_results):
    from mofo.runtime import data as data_io

    manifest, root = mme_results
    ds = data_io.build_dataset(tiny_mme_config(), manifest, root, "train", "pretrain")
    sides = [int(96 * s) for s in (1.0, 0.875, 0.75, 0.66)]
    seen = set()
    for epoch, item in ((e, i) for e in range(3) for i in range(len(ds))):
        ds.set_epoch(epoch)
        sample = ds[item]
        traj, valid = sample["trajectories"], sample["trajectory_valid"]
        assert traj.shape == (64, 4, 2, 2) and valid.shape == (64, 4, 2)
        dx = traj[..., 0][valid]
        assert valid.float().mean() > 0.5 and (traj[..., 1][valid] == 0).all()
        assert (traj[~valid] == 0).all()
        # 2 * SHIFT stored px per frame, resized from a crop of one of the multi-scale widths
        scale = float(dx[0])
        assert torch.allclose(dx, torch.full_like(dx, scale))
        assert min(abs(scale - 2 * SHIFT * 32 / s) for s in sides) < 1e-5, scale
        seen.add(round(scale, 4))
    assert len(seen) > 1  # the crops differ, so do the displacements
    ds.set_epoch(0)
    pixels = data_io.build_dataset(tiny_mme_config(target="pixels"), manifest, root, "train",
                                   "pretrain")
    assert "trajectories" not in pixels[0]
    torch.testing.assert_close(pixels[0]["frames"], ds[0]["frames"])  # same crop, same mask
    torch.testing.assert_close(pixels[0]["mask"], ds[0]["mask"])


def test_a_tiny_pretraining_with_target_mme_trains_end_to_end(mme_results, tmp_path):
    from mofo.training import pretrain

    manifest, root = mme_results
    cfg = tiny_mme_config(epochs=2)
    ckpt = pretrain.run(cfg, manifest, root, "mofo_mme", tmp_path / "pre")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["meta"]["masking"] == "mofo_mme" and saved["meta"]["target"] == "mme"
    assert any(k.startswith("decoder.traj_head") for k in saved["model"])
    records = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert steps and all(np.isfinite(r["loss_trajectory"]) and r["loss_hog"] > 0 for r in steps)
    assert not (tmp_path / "pre" / "reconstructions").exists()
    # the variant row goes on: fine-tuning loads the encoder and leaves MME's heads behind
    from mofo.training import finetune

    ft = finetune.run(tiny_mme_config(), manifest, root, ckpt, "mean", tmp_path / "ft")
    assert torch.load(ft, weights_only=True)["meta"]["pretrain_masking"] == "mofo_mme"
    report = json.loads((tmp_path / "ft" / "load_report.json").read_text())
    assert report["loaded"] and not any("traj_head" in k or "hog_head" in k for k in report["loaded"])
    assert report["dropped"]["decoder.traj_head.weight"] == "pretraining decoder"


def test_the_dag_has_trajectories_jobs_only_for_mme_pretrainings(tmp_path):
    import yaml

    from tests.test_workflow import TINY, job_counts, snakemake

    base = {"results_dir": str(tmp_path / "results"),
            "dataset": {"demo": {"root": str(tmp_path / "demo")}},
            "tracking": {"mlflow": {"enabled": False}}}
    variants = {"videomae": {"label": "VideoMAE", "masking": "tube", "head": "mean"},
                "mme": {"label": "MME", "masking": "tube_mme", "head": "mean"},
                "mofo_mme": {"label": "MOFO mask + MME", "masking": "mofo_mme", "head": "mca"}}
    counts = {}
    for name, overlay in (("default", base), ("mme", {**base, "variants": variants})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(overlay))
        result = snakemake("-n", "--configfile", str(TINY), str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        counts[name] = job_counts(result.stdout)
    assert "trajectories" not in counts["default"]
    assert counts["mme"]["trajectories"] == 2  # one per shard, in the shards' motion chain
    # the overlay's variants join the default four: two more pretrainings, two more fine-tunings
    assert counts["mme"]["pretrain"] == counts["default"]["pretrain"] + 2
    assert counts["mme"]["finetune"] == counts["default"]["finetune"] + 2


def test_mme_target_with_model_side_masking_scores_the_reconstructed_tokens():
    """everest_mme: EVEREST selects in the model; the MME loss covers its reconstructed tokens."""
    from mofo.bench.train import synthetic_batch, with_trajectories
    from mofo.models.build import build_pretrain_model
    from mofo.training.pretrain import mme_dims, pretrain_masks, pretrain_task, stage_config

    cfg = stage_config(load_config(), "everest_mme")
    assert cfg["masking"]["strategy"] == "everest" and cfg["pretrain"]["target"] == "mme"
    torch.manual_seed(0)
    model = build_pretrain_model(cfg["model"], mme_dims=mme_dims(cfg))
    batch = with_trajectories(synthetic_batch(cfg, 2, {"label": 2}), cfg)
    batch.pop("mask")  # a model-side strategy draws no loader mask
    task = pretrain_task(cfg["model"], True, cfg["masking"], cfg["pretrain"]["mme"])
    torch.manual_seed(1)  # the random part of EVEREST's draw
    loss, parts = task(model, batch)
    torch.manual_seed(1)
    hidden, target = pretrain_masks(model, batch, cfg["masking"])
    assert (hidden & ~target).any()  # some tokens are dropped, not reconstructed
    # the same loss from the reconstructed tokens alone: dropped tokens' targets do not count
    pred = model(batch["frames"], hidden, target)
    dropped = (hidden & ~target)[..., None, None, None]
    again, _ = mme_loss(pred, batch["frames"], target, batch["trajectories"] + 99 * dropped,
                        batch["trajectory_valid"], 8, 2, 8, 9)
    assert float(again.detach()) == pytest.approx(float(loss.detach()), rel=1e-5) and set(parts) == {
        "loss_trajectory", "loss_hog"}
