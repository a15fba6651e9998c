"""The paper recipe: global batch -> per-GPU batch and accumulation, VideoMAE's lr schedule,
the published settings held against config/published.yaml, and docs/RECIPE.md in sync."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from mofo.config import REPO_ROOT, load_config
from mofo.recipe import published as recipe
from mofo.recipe.batch import plan_batch
from mofo.training.optim import build_optimizer, build_scheduler

SSV2 = REPO_ROOT / "config" / "ssv2.yaml"
EPIC = REPO_ROOT / "config" / "epic100.yaml"
DEVIATIONS = REPO_ROOT / "config" / "deviations"


@pytest.mark.parametrize("overlay", [SSV2, EPIC], ids=["ssv2", "epic100"])
@pytest.mark.parametrize("gpus, pre_split, ft_split", [
    (1, (32, 64), (8, 64)), (8, (32, 8), (8, 8)), (64, (32, 1), (8, 1))])
def test_recipe_total_batch_on_1_8_64_gpus(overlay, gpus, pre_split, ft_split):
    """VideoMAE's SSV2 recipe: 32 x 64 GPUs = 2048 clips per pretraining step and 8 x 64 =
    512 per fine-tuning step, met on any of these GPU counts by accumulation; the lrs are
    the per-256 values x total / 256 (peak, floor and warm-up start alike)."""
    cfg = load_config([overlay])
    pre, ft = plan_batch(cfg["pretrain"], gpus), plan_batch(cfg["finetune"], gpus)
    assert (pre.per_process, pre.accum_steps, pre.total, pre.exact) == (*pre_split, 2048, True)
    assert (ft.per_process, ft.accum_steps, ft.total, ft.exact) == (*ft_split, 512, True)
    assert (pre.lr, pre.min_lr, pre.warmup_lr) == pytest.approx((1.2e-3, 8e-5, 8e-6))
    assert (ft.lr, ft.min_lr, ft.warmup_lr) == pytest.approx((1e-3, 2e-6, 2e-6))


def test_a_batch_that_cannot_be_met_says_so():
    cfg = {"total_batch": 2048, "batch_size": 32, "accum_steps": "auto", "base_lr": 1.5e-4,
           "min_lr": 1e-5, "warmup_lr": 1e-6}
    plan = plan_batch(cfg, 3)  # 2048 is not a multiple of 3
    assert not plan.exact and plan.total != 2048 and plan.per_process <= 32
    assert plan.describe("pretrain").startswith("WARNING")
    assert plan.lr == pytest.approx(1.5e-4 * plan.total / 256)  # scaled to the batch run
    assert plan.as_dict()["exact"] is False
    # more accumulation rather than an inexact total when an exact split exists
    exact = plan_batch({**cfg, "batch_size": 30}, 8)
    assert (exact.per_process, exact.accum_steps, exact.exact) == (16, 16, True)


def test_a_pinned_accumulation_over_the_memory_limit_is_refused():
    cfg = {"total_batch": 512, "batch_size": 8, "accum_steps": 2, "base_lr": 5e-4,
           "min_lr": 1e-6, "warmup_lr": 1e-6}
    with pytest.raises(ValueError, match="accum_steps 2 on 4 processes needs 64 clips"):
        plan_batch(cfg, 4)
    assert plan_batch(cfg, 32).per_process == 8


def videomae_cosine(base, final, epochs, niter_per_ep, warmup_epochs, start_warmup):
    """VideoMAE's utils.cosine_scheduler, written from its published formula: np.linspace
    warm-up from start_warmup to base over warmup_epochs x niter_per_ep steps, then
    final + (base - final) / 2 x (1 + cos(pi i / n)) over the n remaining steps."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("total_batch", [64, 2048])
def test_lr_curve_is_videomaes_at_two_batch_sizes(total_batch):
    """Every step's lr of every parameter group equals VideoMAE's schedule value (lr, min_lr,
    warmup_lr scaled by total / 256) times the group's layer-decay scale."""
    cfg = {"epochs": 6, "warmup_epochs": 2, "base_lr": 5e-4, "min_lr": 1e-6, "warmup_lr": 1e-6,
           "weight_decay": 0.05, "betas": [0.9, 0.999], "layer_decay": 0.75}
    steps = 7
    model = torch.nn.Sequential()
    model.add_module("patch_embed", torch.nn.Linear(2, 2))
    model.add_module("blocks", torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    model.add_module("head", torch.nn.Linear(2, 2))
    opt = build_optimizer(model, cfg, total_batch)
    sched = build_scheduler(opt, cfg, steps, total_batch)
    scale = total_batch / 256
    want = videomae_cosine(5e-4 * scale, 1e-6 * scale, 6, steps, 2, 1e-6 * scale)
    lr_scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(lr_scales) == 4  # embeddings, two blocks, head
    for step, value in enumerate(want):
        sched.step_update(step)
        for group in opt.param_groups:
            assert math.isclose(group["lr"], value * group["lr_scale"], rel_tol=1e-9), step


def test_the_paper_overlays_are_the_published_recipe():
    for overlay in (SSV2, EPIC):
        cfg = load_config([overlay])
        assert recipe.deviations(cfg) == [], overlay.name
        assert recipe.recipe_label(cfg) == "published"


def test_changing_a_published_value_in_an_overlay_is_caught(tmp_path):
    text = SSV2.read_text().replace("base_lr: 1.5e-4", "base_lr: 3.0e-4")
    assert text != SSV2.read_text()
    changed = tmp_path / "ssv2.yaml"
    changed.write_text(text)
    cfg = load_config([changed])
    assert recipe.deviations(cfg) == [("pretrain.base_lr", 1.5e-4, 3.0e-4)]
    assert recipe.recipe_label(cfg) == "published; also pretrain.base_lr=0.0003"


def test_every_deviation_overlay_changes_the_recipe_and_is_named():
    """Each overlay in config/deviations changes at least one published setting of the
    dataset it is for, and the table's recipe label names exactly it."""
    for path in sorted(DEVIATIONS.glob("*.yaml")):
        base = EPIC if path.stem.startswith("epic") else SSV2
        cfg = load_config([base, path])
        assert recipe.deviations(cfg), path.name
        assert recipe.recipe_label(cfg) == f"published + {path.stem}", path.name
    both = load_config([SSV2, DEVIATIONS / "robust-boxes.yaml", DEVIATIONS / "last-epoch.yaml"])
    assert recipe.recipe_label(both) == "published + last-epoch + robust-boxes"
    assert recipe.recipe_label(load_config()).startswith("own (demo")


def test_every_published_key_exists_in_the_config():
    defaults = load_config()
    for setting in recipe.published_settings():
        assert recipe.lookup(defaults, setting.key) is not recipe._MISSING, setting.key
        assert setting.source.strip(), setting.key


def test_docs_recipe_page_is_generated_from_the_published_table():
    page = (REPO_ROOT / "docs" / "RECIPE.md").read_text()
    assert page == recipe.markdown(), "docs/RECIPE.md is stale: mofo recipe --markdown > docs/RECIPE.md"


def test_mofo_config_shows_the_batch_plan_for_the_gpus_of_a_job():
    out = subprocess.run([sys.executable, "-m", "mofo.cli", "config", "--configfile", str(SSV2),
                          "--gpus", "8"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout)["pretrain"]["total_batch"] == 2048
    assert "pretrain: total batch 2048 = 32 clips x 8 processes x 8 accumulation steps" in out.stderr
    assert "finetune: total batch 512 = 8 clips x 8 processes x 8 accumulation steps" in out.stderr


def test_training_params_are_the_batch_plan_and_recipe():
    """A training job's MLflow params carry its batch plan for the job's processes and the
    recipe it ran (published, or the deviations)."""
    cfg = load_config([SSV2])
    params = recipe.training_params(cfg, "finetune", 8)
    assert params["finetune.plan.total_batch"] == 512
    assert params["finetune.plan.accum_steps"] == 8 and params["finetune.plan.per_process"] == 8
    assert params["finetune.plan.lr"] == pytest.approx(1e-3)
    assert params["recipe"] == "published"
