"""EVEREST / VideoMS motion-centric token selection (masking.strategy: everest) and the mean
head's fine-tuning token drop: exact counts, the static tokens dropped on a clip where one
region moves, any number of temporal slices, a loss and a decoder that ignore dropped tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mofo.config import load_config
from mofo.masking import is_model_side, make_mask, mask_from_config, select_from_config
from mofo.masking.everest import everest_counts, everest_masks, slice_distances
from mofo.models.build import build_classifier, build_pretrain_model
from mofo.training.losses import masked_reconstruction_loss
from mofo.training.pretrain import pretrain_masks, pretrain_task

SIZE, PATCH = 32, 8  # 4 x 4 cells
REGION = (slice(1, 3), slice(1, 3))  # the 2 x 2 cells whose content moves


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_cfg(num_frames: int = 8, tubelet: int = 2) -> dict:
    return {"size": "demo", "input_size": SIZE, "num_frames": num_frames, "patch_size": PATCH,
            "tubelet_size": tubelet, "dims": {}}


def moving_region_clip(num_frames: int, seed: int = 0) -> torch.Tensor:
    """(3, T, 32, 32): a fixed random background; inside the 2 x 2 centre cells a random
    texture slides right by 3 px per frame, so every tubelet of those cells differs from its
    neighbours and every other cell is identical in all frames."""
    rng = np.random.default_rng(seed)
    background = rng.normal(size=(3, SIZE, SIZE))
    texture = rng.normal(size=(3, 2 * PATCH, 2 * PATCH + 3 * num_frames))
    clip = np.repeat(background[:, None], num_frames, axis=1)
    ys, xs = (slice(s.start * PATCH, s.stop * PATCH) for s in REGION)
    for f in range(num_frames):
        clip[:, f, ys, xs] = texture[:, :, 3 * f: 3 * f + 2 * PATCH]
    return torch.from_numpy(clip).float()


def region_tokens(t: int) -> torch.Tensor:
    """bool (t*4*4,): the tokens of the moving cells, token order (t, h, w)."""
    flags = torch.zeros(t, SIZE // PATCH, SIZE // PATCH, dtype=torch.bool)
    flags[:, REGION[0], REGION[1]] = True
    return flags.reshape(-1)


def test_first_slice_takes_the_distance_to_the_next_one():
    grid = (5, 2, 3)
    emb = torch.randn(2, 30, 7)
    dist = slice_distances(emb, grid).reshape(2, 5, 6)
    e = emb.reshape(2, 5, 6, 7)
    for i in range(1, 5):
        torch.testing.assert_close(dist[:, i], (e[:, i] - e[:, i - 1]).norm(dim=-1))
    torch.testing.assert_close(dist[:, 0], (e[:, 1] - e[:, 0]).norm(dim=-1))
    with pytest.raises(ValueError, match="at least 2 temporal slices"):
        slice_distances(torch.randn(1, 6, 7), (1, 2, 3))


@pytest.mark.parametrize("grid,ratio,drop", [((8, 14, 14), 0.9, 0.7), ((4, 4, 4), 0.9, 0.7),
                                             ((3, 5, 7), 0.75, 0.5), ((16, 2, 2), 0.9, 0.05)])
def test_selection_keeps_exactly_the_configured_counts(grid, ratio, drop):
    n = int(np.prod(grid))
    n_drop, n_visible, n_target = everest_counts(n, ratio, drop)
    assert n_drop + n_visible + n_target == n
    assert n_drop == int(np.floor(drop * n + 0.5)) and n_visible == n - int(np.floor(ratio * n + 0.5))
    scores = torch.rand(6, n)
    scores[0] = 0.0  # all tied: the counts still hold
    hidden, target = everest_masks(scores, ratio, drop, torch.Generator().manual_seed(1))
    assert not (target & ~hidden).any()
    assert ((~hidden).sum(1) == n_visible).all() and (target.sum(1) == n_target).all()
    assert ((hidden & ~target).sum(1) == n_drop).all()
    if grid == (8, 14, 14):  # ViT-B 16 x 224 x 224 at the published 0.9 / 0.7
        assert (n_drop, n_visible, n_target) == (1098, 157, 313)


def test_counts_that_leave_nothing_to_see_or_reconstruct_are_refused():
    with pytest.raises(ValueError, match="visible and 0 reconstructed"):
        everest_counts(64, 0.7, 0.7)
    with pytest.raises(ValueError, match="0 visible"):
        everest_counts(64, 1.0, 0.5)


@pytest.mark.parametrize("num_frames,tubelet", [(4, 2), (6, 2), (10, 2), (16, 2), (16, 1)])
def test_static_tokens_are_dropped_for_any_number_of_slices(num_frames, tubelet):
    t = num_frames // tubelet
    cfg = model_cfg(num_frames, tubelet)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    clips = torch.stack([moving_region_clip(num_frames, s) for s in range(3)])
    moving = region_tokens(t)
    masking = {"strategy": "everest", "ratio": 0.9, "everest": {"drop_ratio": 0.7}}
    hidden, target = pretrain_masks(model, {"frames": clips}, masking)
    dropped = hidden & ~target
    n = t * 16
    n_drop, n_visible, n_target = everest_counts(n, 0.9, 0.7)
    assert (dropped.sum(1) == n_drop).all() and ((~hidden).sum(1) == n_visible).all()
    assert (target.sum(1) == n_target).all()
    assert n_drop <= int((~moving).sum())
    assert not (dropped & moving).any(), "a moving token was dropped"
    # Dropping exactly the static tokens keeps exactly the moving region.
    exact = 1 - float(moving.sum()) / n
    hidden, target = select_from_config({**masking, "ratio": 0.875, "everest": {"drop_ratio": exact}},
                                        model.encoder.embed(clips), model.grid)
    assert ((hidden & ~target) == ~moving).all()


def test_everest_is_selected_by_the_model_not_the_loader():
    assert is_model_side("everest") and not is_model_side("tube") and not is_model_side("mofo")
    cfg = {"strategy": "everest", "ratio": 0.9, "inbox_ratio": 0.75, "everest": {"drop_ratio": 0.7}}
    assert mask_from_config(cfg, (4, 4, 4), None, np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="selected inside the model"):
        make_mask("everest", (4, 4, 4), 0.9)
    with pytest.raises(ValueError, match="drawn by the data loader"):
        select_from_config({**cfg, "strategy": "tube"}, torch.randn(1, 64, 8), (4, 4, 4))


def test_dropped_tokens_reach_neither_the_decoder_nor_the_loss():
    cfg = model_cfg()
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).eval()
    frames = torch.stack([moving_region_clip(8, s) for s in range(2)])
    masking = {"strategy": "everest", "ratio": 0.9, "everest": {"drop_ratio": 0.7}}
    hidden, target = pretrain_masks(model, {"frames": frames}, masking)
    dropped = hidden & ~target
    lengths = []
    model.decoder.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))

    def loss_of(x):
        with torch.no_grad():
            pred = model(x, hidden, target)
        return masked_reconstruction_loss(pred, x, target, PATCH, 2)

    base = loss_of(frames)
    assert lengths[-1] == int((~hidden[0]).sum() + target[0].sum()) < 64
    # Scramble the pixels of every dropped token: neither the encoder (it only sees the
    # visible ones), nor the decoder, nor the loss may notice.
    from mofo.models.patches import patchify, unpatchify

    patches = patchify(frames, PATCH, 2)
    noisy = patches.clone()
    noisy[dropped] = torch.randn_like(noisy[dropped]) * 5
    assert loss_of(unpatchify(noisy, PATCH, 2, model.grid)) == base
    changed = patches.clone()
    changed[target] = changed[target] + torch.randn_like(changed[target])
    assert loss_of(unpatchify(changed, PATCH, 2, model.grid)) != base


def test_pretrain_task_trains_with_model_side_selection():
    cfg = load_config(overrides={"model": model_cfg(), "masking": {"strategy": "everest"}})
    torch.manual_seed(0)
    model = build_pretrain_model(cfg["model"])
    task = pretrain_task(cfg["model"], True, cfg["masking"])
    loss, _ = task(model, {"frames": torch.stack([moving_region_clip(8, s) for s in range(2)])})
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0


def test_mean_head_drop_keeps_the_most_moving_tokens():
    cfg = model_cfg()
    moving = region_tokens(4)
    ratio = 1 - float(moving.sum()) / 64  # exactly the static tokens
    torch.manual_seed(0)
    plain = build_classifier(cfg, 3, pooling="mean", drop_path=0.0).eval()
    torch.manual_seed(0)
    dropping = build_classifier(cfg, 3, pooling="mean", drop_path=0.0, mean_drop_ratio=ratio).eval()
    frames = torch.stack([moving_region_clip(8, s) for s in range(2)])
    seen = []
    dropping.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        out = dropping(frames)
        expected = dropping.pool_head(dropping.encode(dropping.embed(frames),
                                                      (~moving).expand(2, -1)))
        full = plain(frames)
    assert seen[0] == int(moving.sum())  # the encoder ran on the kept tokens only
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, full)
    torch.testing.assert_close(full, plain.pool_head(plain.forward_features(frames)))
    assert build_classifier(cfg, 3, pooling="mean").pool_head.drop_ratio == 0.0  # off by default


def test_bench_prints_tokens_and_step_time_per_strategy():
    from mofo.bench.train import format_strategy_table, time_pretrain_strategies

    cfg = load_config(overrides={"model": model_cfg(), "engine": {"device": "cpu"}})
    result = time_pretrain_strategies(cfg, steps=1, batch_size=2)
    rows = result["strategies"]
    assert list(rows) == ["tube", "mofo", "mgmae", "everest"]
    for name in ("tube", "mofo", "mgmae"):  # 14 of 16 cells hidden per slice, all decoded
        assert rows[name]["encoder_tokens"] == 8 and rows[name]["decoder_tokens"] == 64
        assert rows[name]["target_tokens"] == 56 and rows[name]["dropped_tokens"] == 0
    n_drop, n_visible, n_target = everest_counts(64, 0.9, 0.7)
    assert rows["everest"]["encoder_tokens"] == n_visible
    assert rows["everest"]["decoder_tokens"] == n_visible + n_target
    assert rows["everest"]["dropped_tokens"] == n_drop
    assert all(r["step_s"] > 0 for r in rows.values()) and rows["tube"]["step_vs_first"] == 1.0
    table = format_strategy_table(result)
    assert all(name in table for name in rows) and "decoder_tokens" in table


def test_pretrain_stage_and_mean_head_drop_run_end_to_end(tmp_path):
    """The stage on a tiny real frame store: the loader gives no mask, the model selects; the
    reconstruction pictures are drawn; fine-tuning with the mean head's drop trains."""
    from mofo.training import finetune, pretrain
    from tests.test_dataset import make_results

    root = tmp_path / "demo"
    manifest = make_results(root)
    manifest.to_csv(root / "manifest.csv", index=False)
    fast = {"epochs": 1, "warmup_epochs": 0, "total_batch": 2, "batch_size": 2, "num_workers": 0,
            "log_interval": 1}
    cfg = load_config(overrides={
        "model": {**model_cfg(), "sampling_rate": 2}, "engine": {"device": "cpu"},
        "pretrain": {**fast, "n_reconstruction_clips": 1},
        "finetune": {**fast, "mean_drop_ratio": 0.4},
        "dataset": {"demo": {"classes": ["left", "right", "up"]}}})
    ckpt = pretrain.run(cfg, root / "manifest.csv", root, "everest", tmp_path / "pre")
    assert torch.load(ckpt, weights_only=True)["meta"]["masking"] == "everest"
    assert len(list((tmp_path / "pre" / "reconstructions").glob("*.png"))) == 1
    held_out = json.loads((tmp_path / "pre" / "validation.json").read_text())
    assert held_out["masking"] == "everest" and held_out["n_clips"] == 1
    assert held_out["tokens"] == everest_counts(64, 0.9, 0.7)[2]  # the reconstructed ones and np.isfinite(held_out["ratio"])
    ft = finetune.run(cfg, root / "manifest.csv", root, ckpt, "mean", tmp_path / "ft")
    assert torch.load(ft, weights_only=True)["meta"]["finetune_head"] == "mean"
