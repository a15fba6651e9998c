"""Training loop: loss target, resume, NaN stop, signal checkpoint, metrics log, optimizer."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

from mofo.bench.synthetic import SyntheticClipDataset
from mofo.config import load_config
from mofo.models.layers import PatchEmbed3D
from mofo.models.patches import denormalize, patchify, unpatchify
from mofo.runtime.distributed import DistContext, RankInfo, rank_info
from mofo.training import engine
from mofo.training.losses import masked_reconstruction_loss, patch_normalized_target
from mofo.training.optim import build_optimizer
from mofo.training.wrapping import deepspeed_config

TINY_MODEL = {"size": "demo", "input_size": 16, "num_frames": 4, "sampling_rate": 1,
              "patch_size": 8, "tubelet_size": 2}


ENGINE = load_config()["engine"]  # the defaults: resume on, precision auto


def cpu_ctx() -> DistContext:
    return DistContext(RankInfo(0, 0, 1, "single"), torch.device("cpu"), None, "torch")


def stage_cfg(**kw) -> dict:
    cfg = {"epochs": 3, "warmup_epochs": 1, "batch_size": 4, "accum_steps": 1, "base_lr": 1e-2,
           "min_lr": 1e-5, "warmup_lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.95],
           "clip_grad": 1.0, "checkpoint_every": 1, "log_interval": 1, "seed": 3}
    cfg.update(kw)
    return cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the tiny models are faster on one thread, and the test machine is shared
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model() -> torch.nn.Module:
    from mofo.models.build import build_pretrain_model

    torch.manual_seed(0)  # the stages seed before building the model, as here
    return build_pretrain_model(TINY_MODEL, depth=1, decoder_depth=1, drop_path=0.1)


def tiny_loader(n: int = 20) -> DataLoader:
    ds = SyntheticClipDataset(n, TINY_MODEL, mask_ratio=0.75, global_rng_jitter=0.1)
    return DataLoader(ds, batch_size=4, shuffle=True, drop_last=True,
                      generator=torch.Generator())


def pretrain_task():
    from mofo.training.pretrain import pretrain_task as make

    return make(TINY_MODEL, True)


# ----------------------------------------------------------------- loss and target
def test_patch_normalized_target_matches_hand_computation():
    torch.manual_seed(0)
    frames = torch.randn(1, 3, 2, 4, 4)
    target = patch_normalized_target(frames, patch_size=2, tubelet_size=2)
    assert target.shape == (1, 4, 2 * 2 * 2 * 3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    pixels = frames[0] * std + mean
    # token 3 = spatial cell (row 1, col 1): pixels [2:4, 2:4] of both frames
    cube = pixels[:, :, 2:4, 2:4]  # (C, 2, 2, 2) in (c, t, y, x)
    values = cube.permute(1, 2, 3, 0).reshape(8, 3)  # (t, y, x) x channel
    expected = (values - values.mean(0)) / (values.std(0, unbiased=True) + 1e-6)
    assert torch.allclose(target[0, 3], expected.reshape(-1), atol=1e-5)


def test_masked_loss_compares_only_masked_tokens():
    torch.manual_seed(0)
    frames = torch.randn(2, 3, 2, 4, 4)
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    target = patch_normalized_target(frames, 2, 2)
    pred = target[mask].reshape(2, 2, -1).clone()
    assert masked_reconstruction_loss(pred, frames, mask, 2, 2).item() == pytest.approx(0.0)
    pred[0, 1] += 1.0  # one masked token off by 1 everywhere -> mean over 4 tokens = 0.25
    assert masked_reconstruction_loss(pred, frames, mask, 2, 2).item() == pytest.approx(0.25)


def reference_tokens(x: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """Tubelet tokens written out independently of ``mofo``: time-major (t, row, col) over
    the grid, each token (frame, row, column, channel) with the channel innermost."""
    from einops import rearrange

    return rearrange(x, "b c (t q) (h p1) (w p2) -> b (t h w) (q p1 p2 c)", q=q, p1=p, p2=p)


def test_patchify_roundtrip_and_model_order_agree():
    """The loss targets, ``patchify`` and the encoder's Conv3d patch embedding all cut a clip
    into the same tokens in the same order as an einops reference (non-square grid, so a
    swapped row/column or time/space order cannot agree by accident)."""
    torch.manual_seed(0)
    p, q, grid = 4, 2, (3, 2, 3)
    x = torch.randn(2, 3, grid[0] * q, grid[1] * p, grid[2] * p)
    want = reference_tokens(x, p, q)

    assert torch.equal(patchify(x, p, q), want)
    assert torch.equal(unpatchify(want, p, q, grid), x)
    # The training loss's target (ImageNet normalisation undone, no per-patch norm).
    targets = patch_normalized_target(x, p, q, normalize=False)
    assert torch.allclose(targets, reference_tokens(denormalize(x), p, q), atol=1e-6)

    # The model's own token order: with the encoder's patch embedding set so that output
    # channel d reads pixel d (mod the token size) of the reference layout, its tokens are
    # the reference tokens row for row.
    model = tiny_model()
    embed = model.encoder.patch_embed
    assert isinstance(embed, PatchEmbed3D)
    p, q = embed.patch_size, embed.tubelet_size
    x = torch.randn(2, 3, TINY_MODEL["num_frames"], TINY_MODEL["input_size"],
                    TINY_MODEL["input_size"])
    pixels = [(f, r, col, c) for f in range(q) for r in range(p) for col in range(p)
              for c in range(3)]
    with torch.no_grad():
        weight = torch.zeros_like(embed.proj.weight)  # (D, c, q, p, p)
        for d in range(weight.shape[0]):
            f, r, col, c = pixels[d % len(pixels)]
            weight[d, c, f, r, col] = 1.0
        embed.proj.weight.copy_(weight)
        embed.proj.bias.zero_()
        got = model.encoder.embed(x)
    index = torch.arange(weight.shape[0]) % len(pixels)
    assert torch.allclose(got, reference_tokens(x, p, q)[..., index], atol=1e-5)
    assert torch.equal(patchify(x, p, q), reference_tokens(x, p, q))


# ----------------------------------------------------------------- optimizer
def test_optimizer_excludes_biases_norms_and_tokens_from_weight_decay():
    model = tiny_model()
    opt = build_optimizer(model, stage_cfg(), 256)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            no_decay = p.ndim <= 1 or names[id(p)] == "mask_token"
            assert (group["weight_decay"] == 0.0) == no_decay, names[id(p)]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_layer_decay_scales_blocks_geometrically():
    from mofo.models.build import build_classifier

    model = build_classifier(TINY_MODEL, 3, pooling="mca", depth=2)
    opt = build_optimizer(model, stage_cfg(layer_decay=0.5, betas=[0.9, 0.999]), 256)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.125)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.25)
    assert scale["blocks.1.attn.qkv.weight"] == pytest.approx(0.5)
    assert scale["head.weight"] == 1.0 and scale["cross_block.attn.qkv.weight"] == 1.0


# ----------------------------------------------------------------- rank variables
def test_rank_info_prefers_torchrun_over_slurm():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "2"}
    # Expected values written out: torchrun's RANK/LOCAL_RANK/WORLD_SIZE, not SLURM's.
    assert rank_info(env) == RankInfo(rank=3, local_rank=1, world_size=4, source="torchrun")
    slurm = rank_info({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2"})
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.source) == (1, 1, 2, "slurm")
    assert rank_info({}).world_size == 1


# ----------------------------------------------------------------- the loop
def run_train(out, cfg, max_steps=None, callback=None, task=None):
    return engine.train(tiny_model(), tiny_loader(), task or pretrain_task(), stage_cfg=cfg,
                        engine_cfg=ENGINE, ctx=cpu_ctx(), out_dir=out,
                        hash_config={"cfg": cfg}, meta={"masking": "tube"},
                        metrics_callback=callback, max_steps=max_steps, stage="test")


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = stage_cfg()
    full = run_train(tmp_path / "full", cfg)
    assert full.status == "finished" and full.global_step == 3 * 5
    # stop mid-epoch (step 7 of 15 = epoch 1, step 2), then start again in the same folder
    part = run_train(tmp_path / "part", cfg, max_steps=7)
    assert part.status == "stopped" and part.global_step == 7
    resumed = run_train(tmp_path / "part", cfg)
    assert resumed.global_step == 15
    assert part.losses == pytest.approx(full.losses[:7], abs=1e-6)
    assert resumed.losses == pytest.approx(full.losses[7:], abs=1e-6)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the metrics log holds each step once
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == list(range(1, 16))


def test_resume_at_an_epoch_boundary(tmp_path):
    cfg = stage_cfg(epochs=2)
    full = run_train(tmp_path / "full", cfg)
    run_train(tmp_path / "part", cfg, max_steps=5)  # exactly one epoch
    resumed = run_train(tmp_path / "part", cfg)
    assert resumed.losses == pytest.approx(full.losses[5:], abs=1e-6)


def test_changed_config_starts_afresh(tmp_path, capsys):
    run_train(tmp_path, stage_cfg(), max_steps=3)
    other = run_train(tmp_path, stage_cfg(base_lr=2e-2), max_steps=2)
    assert other.global_step == 2
    assert "belongs to another run" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step(tmp_path):
    calls = {"n": 0}
    base = pretrain_task()

    def task(model, batch):
        calls["n"] += 1
        loss, extras = base(model, batch)
        return (loss * float("nan") if calls["n"] == 4 else loss), extras

    with pytest.raises(engine.NonFiniteLossError, match="global step 4"):
        run_train(tmp_path, stage_cfg(), task=task)


def test_infinite_loss_stops_with_the_step(tmp_path):
    """+inf is not NaN: the run must stop on it too, naming the step (docs/METHODS.md, "Resume")."""
    calls = {"n": 0}
    base = pretrain_task()

    def task(model, batch):
        calls["n"] += 1
        loss, extras = base(model, batch)
        return (loss + float("inf") if calls["n"] == 6 else loss), extras

    with pytest.raises(engine.NonFiniteLossError, match=r"loss is inf at global step 6 \(epoch"):
        run_train(tmp_path, stage_cfg(), task=task)
    assert calls["n"] == 6  # stopped at once, no further step
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2, 3, 4, 5]


def test_signal_writes_checkpoint_and_exits_for_requeue(tmp_path):
    calls = {"n": 0}
    base = pretrain_task()

    def task(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM --signal=USR1@... sends
        return base(model, batch)

    def before_handler(signum, frame):  # a handler of our own, to see it come back
        raise AssertionError("the test's SIGUSR1 handler must not be called during training")

    previous = signal.signal(signal.SIGUSR1, before_handler)
    try:
        with pytest.raises(SystemExit) as info:
            run_train(tmp_path, stage_cfg(), task=task)
        after = signal.getsignal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert info.value.code == engine.REQUEUE_EXIT_CODE
    ckpt = torch.load(tmp_path / "checkpoint-last.pt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["step_in_epoch"] == 3
    assert after is before_handler  # the handler in place before training is restored
    resumed = run_train(tmp_path, stage_cfg())
    assert resumed.global_step == 15 and len(resumed.losses) == 12


def test_metrics_callback_and_jsonl(tmp_path):
    seen = []
    result = run_train(tmp_path, stage_cfg(epochs=1), callback=lambda r, s: seen.append((r, s)))
    assert result.status == "finished"
    kinds = [r["type"] for r, _ in seen]
    assert kinds.count("step") == 5 and kinds.count("epoch") == 1 and kinds[-1] == "end"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in lines] == kinds
    assert all(math.isfinite(r["loss"]) for r in lines if "loss" in r)
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert final["meta"] == {"masking": "tube"} and "optimizer" not in final


def test_pretraining_loss_decreases(tmp_path):
    result = run_train(tmp_path, stage_cfg(epochs=4, base_lr=5e-2))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first


def test_default_config_has_training_sections():
    cfg = load_config()
    for key in ("pretrain", "finetune", "evaluate", "variants", "engine"):
        assert key in cfg
    labels = {v["label"]: (v["masking"], v["head"]) for v in cfg["variants"].values()}
    assert labels["VideoMAE"] == ("tube", "mean") and labels["MOFO†"] == ("mofo", "mca")


# ----------------------------------------------------------------- gradient accumulation
def grads_of_first_step(batch_size: int, accum_steps: int, tmp_path) -> tuple[dict, float]:
    """The gradients the optimizer sees at its first step and its scaled peak lr, training
    the tiny model (dropout and drop path off, no clipping) on 16 clips."""
    from mofo.models.build import build_pretrain_model

    torch.manual_seed(0)
    model = build_pretrain_model(TINY_MODEL, depth=1, decoder_depth=1, drop_path=0.0)
    loader = DataLoader(SyntheticClipDataset(16, TINY_MODEL, mask_ratio=0.75),
                        batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator())
    seen: dict = {}

    def capture(optimizer, _args, _kwargs):
        if not seen:
            seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.grad is not None}
            seen["lr"] = optimizer.param_groups[0]["initial_lr"]

    handle = register_optimizer_step_pre_hook(capture)
    try:
        cfg = stage_cfg(batch_size=batch_size, accum_steps=accum_steps, clip_grad=0.0, epochs=1)
        engine.train(model, loader, pretrain_task(), stage_cfg=cfg, engine_cfg={**ENGINE, "resume": False},
                     ctx=cpu_ctx(), out_dir=tmp_path, hash_config={"cfg": cfg}, max_steps=1,
                     stage="test")
    finally:
        handle.remove()
    return seen["grads"], seen["lr"]


def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch(tmp_path):
    big, lr_big = grads_of_first_step(8, 1, tmp_path / "big")
    acc, lr_acc = grads_of_first_step(2, 4, tmp_path / "acc")
    assert big.keys() == acc.keys() and len(big) > 10
    for name, g in big.items():
        rel = float((acc[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"
    # The lr follows the effective batch (8 clips per optimizer step in both runs) ...
    assert lr_acc == pytest.approx(lr_big) == pytest.approx(1e-2 * 8 / 256)
    # ... and a run without accumulation on the same micro-batch is a different run.
    small, lr_small = grads_of_first_step(2, 1, tmp_path / "small")
    assert lr_small == pytest.approx(1e-2 * 2 / 256)
    assert max(float((small[n] - g).norm() / g.norm()) for n, g in big.items()) > 1e-2


def test_effective_batch_is_batch_times_processes_times_accumulation():
    assert engine.effective_batch({"batch_size": 32, "accum_steps": 8}, 8) == 2048
    assert engine.effective_batch({"batch_size": 4, "accum_steps": 1}, 2) == 8
    ds = deepspeed_config({"clip_grad": 1.0}, ENGINE, batch_size=4, world=2, accum_steps=3,
                                 device=torch.device("cpu"))
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 24


def test_accumulation_resumes_at_optimizer_steps_only(tmp_path):
    """5 micro-batches of 4 per epoch, accum 2: 2 optimizer steps per epoch (the 5th
    micro-batch is not drawn); a stop signal inside a window checkpoints after the window."""
    cfg = stage_cfg(accum_steps=2)
    full = run_train(tmp_path / "full", cfg)
    assert full.status == "finished" and full.global_step == 3 * 2
    calls = {"n": 0}
    base = pretrain_task()

    def task(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # first micro-batch of optimizer step 3 (epoch 1, step 1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return base(model, batch)

    with pytest.raises(SystemExit):
        run_train(tmp_path / "part", cfg, task=task)
    assert calls["n"] == 6  # the window was finished before the checkpoint
    ckpt = torch.load(tmp_path / "part" / "checkpoint-last.pt", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (3, 1, 1)
    resumed = run_train(tmp_path / "part", cfg)
    assert resumed.global_step == 6
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == list(range(1, 7))


# ----------------------------------------------------------------- torch.compile (issue 24)
def test_a_compiled_run_saves_plain_keys_and_resumes_uncompiled_and_back(tmp_path):
    """``engine.compile``: the model is trained through torch.compile (backend aot_eager here:
    the graph capture and the wrapper, without generating kernels, which takes minutes on a
    CPU), yet checkpoint-last.pt and checkpoint.pt hold the plain module's keys (no
    ``_orig_mod.``), so a compiled run resumes in an uncompiled one and back, with the
    losses of an uncompiled run from start to end."""
    cfg = stage_cfg()
    compiled = {**ENGINE, "compile": True, "compile_backend": "aot_eager"}

    def run(out, engine_cfg, max_steps=None):
        return engine.train(tiny_model(), tiny_loader(), pretrain_task(), stage_cfg=cfg,
                            engine_cfg=engine_cfg, ctx=cpu_ctx(), out_dir=out,
                            hash_config={"cfg": cfg}, max_steps=max_steps, stage="test")

    plain = run(tmp_path / "plain", ENGINE)
    out = tmp_path / "mixed"
    first = run(out, compiled, max_steps=4)
    keys = torch.load(out / "checkpoint-last.pt", weights_only=True)["model"]
    assert not [k for k in keys if "_orig_mod" in k] and "mask_token" in keys
    second = run(out, ENGINE, max_steps=9)  # compiled -> plain
    third = run(out, compiled)  # plain -> compiled, to the end
    assert third.status == "finished" and third.global_step == plain.global_step
    assert first.losses + second.losses + third.losses == pytest.approx(plain.losses, rel=1e-5)
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(final["model"]) == set(torch.load(tmp_path / "plain" / "checkpoint.pt",
                                                 weights_only=True)["model"])


def test_pretrained_weights_of_a_compiled_model_load_into_a_plain_one():
    """Other code's checkpoints of compiled (and DDP-wrapped) models carry ``_orig_mod.``
    (VideoMAE V2's issue #33); load_pretrained takes them as plain keys."""
    from mofo.models.checkpoint import load_pretrained

    source = tiny_model()
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    target = tiny_model()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    load_pretrained(target, {"model": wrapped})
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
