"""MGMAE masking: the visible region follows the flow, exact counts, the pooled flow and its
crop to the token grid, and the loader / flow job / pretraining wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mofo.config import load_config
from mofo.formats.tokenflow import clip_token_flow, pool_flow, pooled_flow_path, pooled_grid
from mofo.inputs import dataset as D
from mofo.masking import make_mask, mask_from_config, needs_token_flow, tube_mask
from mofo.masking.mgmae import bilinear_sample, mgmae_scores, top_cells
from tests.test_dataset import NUM_FRAMES, PATCH, SIZE, TUBELET, H, W, make_config, make_results

GRID = (8, 14, 14)  # VideoMAE's 16 frames / tubelet 2, 224 / 16
N_FRAMES = 16
BASE = N_FRAMES // 2  # "middle": frame 8, the first frame of slice 4
BASE_SLICE = BASE // 2
SIGMA = 0.7071  # MGMAE's exp(-(d/patch)^2)
# Six centres far apart, inside the grid wherever a 1-cell-per-slice motion takes them.
CENTRES = np.array([(r, c) for r in (4, 6, 8) for c in (5, 9)])
CENTRES_Y = np.array([(r, c) for r in (5, 9) for c in (3, 7, 11)])


MASKING = load_config()["masking"]  # the defaults (loading the config takes a while)


def options(**kw) -> dict:
    return dict(MASKING["mgmae"], **kw)


def masking_cfg(**kw) -> dict:
    return dict(MASKING, strategy="mgmae", **kw)


def uniform_flow(dx: float, dy: float, frames: int = N_FRAMES, grid=GRID) -> np.ndarray:
    flow = np.zeros((frames - 1, grid[1], grid[2], 2))
    flow[..., 0], flow[..., 1] = dx, dy
    return flow


def visible_cells(scores: np.ndarray, n_visible: int) -> list[set[tuple[int, int]]]:
    w = GRID[2]
    vis = top_cells(scores, n_visible, np.random.default_rng(0))
    return [{(int(i) // w, int(i) % w) for i in np.flatnonzero(row)} for row in vis]


def shifted(centres: np.ndarray, rows: int, cols: int) -> set[tuple[int, int]]:
    return {(int(r) + rows, int(c) + cols) for r, c in centres}


# ----------------------------------------------------------------------------- following the flow


@pytest.mark.parametrize(("dx", "dy", "centres"), [(0.5, 0.0, CENTRES), (0.0, -0.5, CENTRES_Y)])
def test_visible_set_moves_one_cell_per_slice_with_a_uniform_translation(dx, dy, centres):
    # Half a cell per frame, two frames per slice: the visible cells move one cell per slice,
    # before the middle base frame (backward warping) as after it (forward warping).
    scores = mgmae_scores(GRID, uniform_flow(dx, dy), centres, SIGMA, "max", BASE)
    per_slice = visible_cells(scores, len(centres))
    for s, cells in enumerate(per_slice):
        k = s - BASE_SLICE
        assert cells == shifted(centres, round(2 * dy * k), round(2 * dx * k)), f"slice {s}"


@pytest.mark.parametrize("moving", ["before", "after"])
def test_each_side_of_the_base_frame_follows_its_own_flow(moving):
    # Flow only before the middle frame: the earlier slices move, the later ones stay (and the
    # other way round) -- backward and forward warping checked one at a time.
    flow = uniform_flow(0.5, 0.0)
    if moving == "before":
        flow[BASE:] = 0.0
    else:
        flow[:BASE] = 0.0
    per_slice = visible_cells(mgmae_scores(GRID, flow, CENTRES, SIGMA, "max", BASE), len(CENTRES))
    for s, cells in enumerate(per_slice):
        k = s - BASE_SLICE
        moves = (k < 0) if moving == "before" else (k > 0)
        assert cells == shifted(CENTRES, 0, k if moves else 0), f"slice {s}"


def test_base_frame_first_warps_forward_only():
    scores = mgmae_scores(GRID, uniform_flow(0.25, 0.0), CENTRES - [0, 4], SIGMA, "max", 0)
    per_slice = visible_cells(scores, len(CENTRES))
    # a quarter cell per frame: half a cell per slice; the first slice holds the centres
    assert per_slice[0] == shifted(CENTRES, 0, -4)
    assert per_slice[2] == shifted(CENTRES, 0, -3) and per_slice[6] == shifted(CENTRES, 0, -1)


def _tracked_share(flow: np.ndarray, cells_per_slice: int, seeds=range(8)) -> float:
    """Share of the base slice's visible cells, moved by ``cells_per_slice`` per slice, that
    are visible in the other slices (where the move keeps them in the grid)."""
    t, h, w = GRID
    hit = total = 0
    for seed in seeds:
        mask = mask_from_config(masking_cfg(), GRID, None, np.random.default_rng(seed), token_flow=flow)
        vis = ~mask.reshape(t, h, w)
        for s in range(t):
            shift = cells_per_slice * (s - BASE_SLICE)
            for r, c in np.argwhere(vis[BASE_SLICE]):
                if 0 <= c + shift < w:
                    total += 1
                    hit += bool(vis[s, r, c + shift])
    return hit / total


def test_strategy_masks_follow_a_translation_through_the_config():
    flow = uniform_flow(0.5, 0.0)
    assert _tracked_share(flow, 1) > 0.95  # the visible region moves with the content
    assert _tracked_share(flow, 0) < 0.4  # it does not stand still like a tube
    assert _tracked_share(uniform_flow(0.0, 0.0), 0) == 1.0  # no motion: tubes
    assert _tracked_share(uniform_flow(-0.5, 0.0), 1) < 0.4  # other way: other cells


def test_bilinear_sample_is_exact_on_an_affine_field_and_flags_the_outside():
    rows, cols = np.mgrid[0:5, 0:7].astype(np.float64)
    field = np.stack([2 * rows + 1, cols - 3 * rows], axis=-1)  # affine in (row, col)
    y = np.array([0.0, 1.25, 3.5, -0.5, 4.5, -0.6, 2.0])
    x = np.array([0.0, 2.75, 6.4, -0.5, 6.5, 1.0, 7.2])
    values, inside = bilinear_sample(field, y, x, extrapolate=True)
    np.testing.assert_array_equal(inside, [True, True, True, True, True, False, False])
    np.testing.assert_allclose(values[:5, 0], 2 * y[:5] + 1)  # to the frame's edge, exactly
    np.testing.assert_allclose(values[:5, 1], x[:5] - 3 * y[:5])
    clamped, _ = bilinear_sample(field, np.array([-0.5, 4.5]), np.array([-0.5, 6.5]))
    np.testing.assert_allclose(clamped, field[[0, 4], [0, 6]])  # the edge cells' values


# ----------------------------------------------------------------------------- counts and errors


@settings(max_examples=60, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8)),
    tubelet=st.integers(1, 3),
    ratio=st.floats(0.0, 1.0, allow_nan=False),
    scale=st.floats(0.0, 3.0),
    base_frame=st.sampled_from(["middle", "first", "random"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_count_in_every_slice_and_in_total(grid, tubelet, ratio, scale, base_frame, seed):
    t, h, w = grid
    rng = np.random.default_rng(seed)
    flow = rng.normal(0.0, scale, (t * tubelet - 1, h, w, 2))
    mask = make_mask("mgmae", grid, ratio, generator=rng, token_flow=flow,
                     options=options(base_frame=base_frame))
    assert mask.dtype == bool and mask.shape == (t * h * w,)
    per_slice = min(h * w, math.floor(ratio * h * w + 0.5))  # round half up, not from the code
    assert (mask.reshape(t, h * w).sum(1) == per_slice).all()
    assert mask.sum() == t * per_slice == tube_mask(grid, ratio, np.random.default_rng(0)).sum()


def test_exact_counts_at_the_demo_and_videomae_grids():
    for grid, ratio in [((4, 4, 4), 0.9), (GRID, 0.9), (GRID, 0.75)]:
        flow = np.random.default_rng(1).normal(0, 1, (2 * grid[0] - 1, grid[1], grid[2], 2))
        mask = mask_from_config(masking_cfg(ratio=ratio), grid, None, np.random.default_rng(2), token_flow=flow)
        n = grid[1] * grid[2]
        assert (mask.reshape(grid[0], n).sum(1) == round(ratio * n)).all()


def test_clear_errors():
    flow = uniform_flow(0.5, 0.0)
    with pytest.raises(ValueError, match="token_flow.*pooled.npz"):
        make_mask("mgmae", GRID, 0.9, generator=np.random.default_rng(0), options=options())
    with pytest.raises(ValueError, match=r"shape \(frames-1, 14, 14, 2\)"):
        make_mask("mgmae", GRID, 0.9, token_flow=flow[:, :7], options=options())
    with pytest.raises(ValueError, match="multiple of the 8 temporal slices"):
        make_mask("mgmae", GRID, 0.9, token_flow=flow[:-1], options=options())
    with pytest.raises(ValueError, match="masking.mgmae section"):
        make_mask("mgmae", GRID, 0.9, token_flow=flow)
    with pytest.raises(ValueError, match="base_frame"):
        make_mask("mgmae", GRID, 0.9, token_flow=flow, options=options(base_frame="last"))
    with pytest.raises(ValueError, match="num_gaussians"):
        make_mask("mgmae", GRID, 0.9, token_flow=flow, options=options(num_gaussians=500))
    assert needs_token_flow("mgmae") and not needs_token_flow("tube") and not needs_token_flow("mofo")


def test_same_seed_same_mask():
    flow = np.random.default_rng(3).normal(0, 1, (N_FRAMES - 1, 14, 14, 2))
    for base_frame in ("middle", "random"):
        cfg = masking_cfg(mgmae=options(base_frame=base_frame))
        a = [mask_from_config(cfg, GRID, None, np.random.default_rng(s), token_flow=flow) for s in range(4)]
        b = [mask_from_config(cfg, GRID, None, np.random.default_rng(s), token_flow=flow) for s in range(4)]
        assert all((x == y).all() for x, y in zip(a, b))
        assert len({x.tobytes() for x in a}) == 4


# ----------------------------------------------------------------------------- pooled flow


def test_pool_flow_averages_cells_in_frame_fractions():
    flow = np.zeros((2, 96, 128, 2), np.float32)
    flow[0, ..., 0] = 3.0  # 3 px right on a 128-px-wide grid
    flow[1, :, :64, 1] = -2.0  # left half moves 2 px up on a 96-px-high grid
    pooled = pool_flow(flow, 16)
    assert pooled_grid(96, 128, 16) == (16, 21) and pooled.shape == (2, 16, 21, 2)
    assert pooled.dtype == np.float16
    np.testing.assert_allclose(pooled[0, ..., 0].astype(np.float32), 3 / 128, rtol=1e-3)
    left, right = pooled[1, :, :10, 1].astype(np.float32), pooled[1, :, 11:, 1].astype(np.float32)
    np.testing.assert_allclose(left, -2 / 96, rtol=1e-3)
    np.testing.assert_allclose(right, 0.0, atol=1e-6)
    assert pool_flow(np.zeros((0, 20, 30, 2)), 16).shape == (0, 16, 24, 2)


def test_token_flow_is_cropped_scaled_and_chained():
    pooled = np.zeros((9, 16, 21, 2), np.float32)
    pooled[..., 0] = 2 / 128  # 2 px of a 128-px frame per stored pair, everywhere
    crop = (16, 0, 96, 96)  # a 96-px square of the 128 x 96 frame, resized to 32
    flow = clip_token_flow(pooled, np.array([0, 2, 4, 4]), crop, (128, 96), 32, 8)
    assert flow.shape == (3, 4, 4, 2) and flow.dtype == np.float32
    per_pair = 2 * (32 / 96) / 8  # px -> crop px -> token cells
    np.testing.assert_allclose(flow[:2, ..., 0], 2 * per_pair, rtol=1e-5)  # two stored pairs
    np.testing.assert_allclose(flow[2], 0.0)  # a repeated frame moves nothing
    np.testing.assert_allclose(flow[..., 1], 0.0, atol=1e-7)

    # Only the left half of the frame moves: a crop there moves, a crop on the right does not.
    half = np.zeros((1, 16, 21, 2), np.float32)
    half[:, :, :10, 0] = 4 / 128
    left = clip_token_flow(half, np.array([0, 1]), (0, 0, 48, 48), (128, 96), 32, 8)
    right = clip_token_flow(half, np.array([0, 1]), (80, 48, 48, 48), (128, 96), 32, 8)
    np.testing.assert_allclose(left[..., 0], 4 * (32 / 48) / 8, rtol=1e-4)
    np.testing.assert_allclose(right, 0.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        clip_token_flow(pooled, np.array([2, 0]), crop, (128, 96), 32, 8)


def test_flow_shard_keeps_the_pooled_flow(tmp_path):
    from mofo.formats.framestore import FrameStoreWriter
    from mofo.motion.flow import flow_shard
    from tests.test_flow import translating_clip

    prefix = tmp_path / "frames" / "shard-0000"
    with FrameStoreWriter(prefix) as writer:
        for clip_id, n in [("a", 4), ("single", 1)]:
            writer.begin_clip(clip_id, src_height=48, src_width=64, fps=12.0)
            writer.add_frames(translating_clip(n, dx=2, dy=0))  # content moves 2 px left
            writer.end_clip()
    cfg = dict(load_config()["optical_flow"], method="dis", scale=0.5, pooled_cells=8)
    pooled_out = pooled_flow_path(tmp_path, "shard-0000")
    flow_shard(prefix, tmp_path / "flow" / "shard-0000.npz", cfg, pooled_out=pooled_out)
    with np.load(pooled_out) as data:
        assert sorted(data.files) == ["a", "single"]
        assert data["a"].shape == (3, 8, 11, 2) and data["single"].shape == (0, 8, 11, 2)
        inner = data["a"][:, 2:-2, 2:-2].astype(np.float32)
        assert np.median(inner[..., 0]) == pytest.approx(-2 / 64, abs=0.2 / 32)  # scale-free


# ----------------------------------------------------------------------------- loader and stage


def write_uniform_pooled(root, manifest, dx_frac: float) -> None:
    for shard, part in manifest.groupby("shard"):
        pooled = np.zeros((19, 6, 8, 2), np.float16)  # 20 stored frames
        pooled[..., 0] = dx_frac
        path = pooled_flow_path(root, f"shard-{shard:04d}")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{str(c): pooled for c in part["clip_id"]})


def test_dataset_masks_each_clip_from_its_cropped_flow(tmp_path):
    root = tmp_path / "demo"
    manifest = make_results(root)
    config = make_config()
    config["masking"]["strategy"] = "mgmae"
    with pytest.raises(D.DatasetError, match="shard-0000.pooled.npz"):
        D.VideoClipDataset(manifest, root, "train", "pretrain", config, seed=1)[0]
    write_uniform_pooled(root, manifest, 2 / W)  # 2 px right per stored frame
    ds = D.VideoClipDataset(manifest, root, "train", "pretrain", config, seed=1)
    grid = (NUM_FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH)
    for item in range(len(ds)):
        sample = ds[item]
        mask = sample["mask"].numpy()
        assert (mask.reshape(grid[0], -1).sum(1) == 14).all()  # 0.9 of 16 cells per slice
        # the same path by hand: sampled frames, the crop, the flow at the token grid
        rng = ds.sample_rng(item)
        indices = ds.frame_indices(item, rng)
        frames, boxes = ds.load(item, indices)
        _, boxes, crop = ds.spatial(frames, boxes, rng)
        flow = ds.token_flow(item, indices, crop, (W, H))
        expected = 2 * 2 * SIZE / (crop[2] * PATCH)  # 2 px x sampling rate 2, in cells
        np.testing.assert_allclose(flow[..., 0], expected, rtol=1e-2)
        again = mask_from_config(ds.masking_cfg, grid, sample["inbox"].numpy(), rng, token_flow=flow)
        np.testing.assert_array_equal(mask, again)
    # tube masking never reads the flow
    config["masking"]["strategy"] = "tube"
    assert not D.VideoClipDataset(manifest, root, "train", "pretrain", config, seed=1).reads_flow


def test_pretraining_accepts_registered_strategies_and_digests_the_flow(tmp_path):
    from mofo.runtime import data as data_io
    from mofo.training.pretrain import provenance, stage_config

    config = stage_config(load_config(), "mgmae")
    assert config["masking"]["strategy"] == "mgmae"
    with pytest.raises(ValueError, match="mgmae"):
        stage_config(load_config(), "bogus")
    root = tmp_path / "demo"
    manifest = make_results(root)
    manifest.to_csv(root / "manifest.csv", index=False)
    write_uniform_pooled(root, manifest, 0.01)
    files = data_io.input_files(root / "manifest.csv", root, pooled_flow=True)
    assert "flow/shard-0001.pooled.npz" in files
    prov = provenance(config, root / "manifest.csv", root)
    assert prov["inputs"]["flow/shard-0000.pooled.npz"] != "absent"
    assert "flow/shard-0000.pooled.npz" not in provenance(
        stage_config(load_config(), "tube"), root / "manifest.csv", root)["inputs"]


def test_mgmae_settings_rerun_the_mgmae_pretraining_only():
    from mofo.provenance import stage_hash, stage_settings

    cfg = load_config()
    other = load_config(overrides={"masking": {"mgmae": {"sigma": 1.5}}})
    assert stage_hash(cfg, "pretrain", "mgmae") != stage_hash(other, "pretrain", "mgmae")
    for masking in ("tube", "mofo"):
        assert stage_hash(cfg, "pretrain", masking) == stage_hash(other, "pretrain", masking)
    assert stage_settings(cfg, "pretrain", "mgmae")["masking.mgmae"]["sigma"] == SIGMA
    # the other stages never read it
    for stage in ("optical_flow", "motion_map", "finetune", "evaluate"):
        assert stage_hash(cfg, stage) == stage_hash(other, stage)


def test_test_views_carry_their_flow_and_validation_masks_use_it(tmp_path):
    from mofo.inputs import transforms
    from mofo.models.build import build_pretrain_model
    from mofo.training.validation import validation_reconstruction

    root = tmp_path / "demo"
    manifest = make_results(root)
    manifest.to_csv(root / "manifest.csv", index=False)
    write_uniform_pooled(root, manifest, 2 / W)
    config = make_config()
    config["masking"]["strategy"] = "mgmae"
    ds = D.VideoClipDataset(manifest, root, "validation", "test", config, test_view=(0, 0),
                            num_clips=1, num_crops=1, token_flow=True)
    sample = ds[0]
    out_w, _ = transforms.short_side_size(W, H, SIZE)  # the centre crop is SIZE * W / out_w wide
    per_pair = 2 * SIZE / (SIZE * W / out_w * PATCH)
    steps = np.diff(sample["frame_indices"].numpy())[:, None, None]
    flow = sample["token_flow"][..., 0].numpy()
    np.testing.assert_allclose(flow, np.broadcast_to(steps * per_pair, flow.shape), rtol=1e-2)
    with pytest.raises(ValueError, match="token_flow is only available"):
        D.VideoClipDataset(manifest, root, "train", "finetune", config, token_flow=True)
    model = build_pretrain_model(config["model"])
    result = validation_reconstruction(model, config, root / "manifest.csv", root, torch.device("cpu"))
    assert result["masking"] == "mgmae" and result["n_clips"] == 1
    assert result["tokens"] == 14 * NUM_FRAMES // TUBELET  # exact count per slice, held out too
