"""The VideoMAE ViT: names, shapes, position table, attention, masking, a short overfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mofo.config import load_config
from mofo.masking import make_mask, token_grid
from mofo.models import (
    build_classifier,
    build_pretrain_model,
    layer_id_for_lr_decay,
    patchify,
    pixel_targets,
    sincos_position_table,
)
from mofo.models.layers import Attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {
    "size": "demo",
    "input_size": 16,
    "num_frames": 4,
    "sampling_rate": 1,
    "patch_size": 4,
    "tubelet_size": 2,
}  # grid (2, 4, 4) = 32 tokens
TINY_SPEC = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "decoder_dim": 16,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def test_sincos_table_matches_videomae_formula():
    n, d = 7, 10
    want = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    want[:, 0::2], want[:, 1::2] = np.sin(want[:, 0::2]), np.cos(want[:, 1::2])
    got = sincos_position_table(n, d)
    assert got.shape == (1, n, d)
    assert np.allclose(got[0].numpy(), want, atol=1e-6)


def test_patchify_layout():
    video = torch.randn(2, 3, 4, 8, 12)
    tokens = patchify(video, patch_size=4, tubelet_size=2)  # grid (2, 2, 3)
    assert tokens.shape == (2, 12, 2 * 4 * 4 * 3)
    ti, hi, wi = 1, 0, 2
    n = (ti * 2 + hi) * 3 + wi
    cube = video[1, :, 2:4, 0:4, 8:12]  # (c, frame, row, col)
    assert torch.equal(tokens[1, n], cube.permute(1, 2, 3, 0).reshape(-1))


def test_pixel_targets_normalise_each_patch_per_channel():
    torch.manual_seed(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = torch.rand(2, 3, 4, 8, 8)
    normed = (raw - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)
    plain = pixel_targets(normed, 4, 2, mean, std, normalize=False)
    assert torch.allclose(plain, patchify(raw, 4, 2), atol=1e-6)
    targets = pixel_targets(normed, 4, 2, mean, std)
    cube = raw[1, 2, 2:4, 4:8, 0:4].reshape(-1)  # token (t1, row 1, col 0) = 6, channel 2
    want = (cube - cube.mean()) / (cube.std() + 1e-6)
    assert torch.allclose(targets[1, 6].reshape(-1, 3)[:, 2], want, atol=1e-5)


def test_attention_matches_manual_softmax():
    torch.manual_seed(0)
    attn = Attention(12, 3).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 12)
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    q, k, v = (
        F.linear(x, w, b).reshape(2, 5, 3, 4).transpose(1, 2)
        for w, b in ((w_q, attn.q_bias), (w_k, None), (w_v, attn.v_bias))
    )
    out = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    want = attn.proj(out.transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(attn(x), want, atol=1e-6)


def test_official_parameter_names_base():
    cfg = {**TINY, "size": "base", "input_size": 224, "num_frames": 16, "patch_size": 16}
    with torch.device("meta"):
        clf = build_classifier(cfg, 174)
        pre = build_pretrain_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in clf.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (768, 3, 2, 16, 16)
    assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["blocks.0.attn.q_bias"] == shapes["blocks.0.attn.v_bias"] == (768,)
    assert "blocks.0.attn.k_bias" not in shapes and "blocks.0.attn.qkv.bias" not in shapes
    assert shapes["blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert shapes["fc_norm.weight"] == (768,) and shapes["head.weight"] == (174, 768)
    assert "norm.weight" not in shapes and "pos_embed" not in shapes
    assert clf.pos_embed.shape == (1, 1568, 768)
    assert sum(v.numel() for v in clf.parameters()) == pytest.approx(86.4e6, rel=0.01)
    pre_shapes = {k: tuple(v.shape) for k, v in pre.state_dict().items()}
    assert pre_shapes["encoder.norm.weight"] == (768,)
    assert pre_shapes["encoder_to_decoder.weight"] == (384, 768)
    assert pre_shapes["mask_token"] == (1, 1, 384)
    assert pre_shapes["decoder.blocks.3.attn.qkv.weight"] == (1152, 384)
    assert "decoder.blocks.4.norm1.weight" not in pre_shapes
    assert pre_shapes["decoder.head.weight"] == (1536, 384)


def tiny_batch(strategy="tube", b=3, seed=0):
    rng = np.random.default_rng(seed)
    masks = [
        make_mask(strategy, (2, 4, 4), 0.75, rng.random(32) < 0.3, 0.75, rng) for _ in range(b)
    ]
    return torch.from_numpy(np.stack(masks))


def test_pretrain_forward_shapes_and_mask_checks():
    torch.manual_seed(0)
    model = build_pretrain_model(TINY, **TINY_SPEC)
    x = torch.randn(3, 3, 4, 16, 16)
    mask = tiny_batch("mofo")
    out = model(x, mask)
    assert out.shape == (3, 24, 2 * 4 * 4 * 3)
    bad = mask.clone()
    bad[0, mask[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number"):
        model(x, bad)
    with pytest.raises(ValueError, match="expected clips"):
        model(torch.randn(3, 3, 4, 16, 20), mask)


def test_masked_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    model = build_pretrain_model(TINY, **TINY_SPEC).eval()
    x = torch.randn(1, 3, 4, 16, 16)
    mask = torch.zeros(1, 32, dtype=torch.bool)
    mask[0, :24] = True  # tokens 0..23 hidden, 24..31 visible
    hidden_changed, visible_changed = x.clone(), x.clone()
    hidden_changed[0, :, 0:2, 0:4, 0:4] += torch.randn(3, 2, 4, 4)  # token 0 = (t0, row 0, col 0)
    visible_changed[0, :, 2:4, 12:16, 12:16] += torch.randn(3, 2, 4, 4)  # token 31
    before = model.encoder(x, mask)
    assert before.shape == (1, 8, 32)
    assert torch.allclose(model.encoder(hidden_changed, mask), before)
    assert not torch.allclose(model.encoder(visible_changed, mask), before)


def test_pretraining_overfits_one_batch():
    torch.manual_seed(0)
    model = build_pretrain_model(TINY, **TINY_SPEC)
    # Smooth moving stripes: a masked patch is predictable from its position and neighbours.
    t, y, xx = torch.meshgrid(
        torch.arange(4.0), torch.arange(16.0), torch.arange(16.0), indexing="ij"
    )
    x = torch.stack([torch.sin(0.4 * xx + 0.2 * y + 0.5 * t + c) for c in range(3)])
    x = torch.stack([x, x.flip(-1)])
    mask = tiny_batch(b=2)
    target = patchify(x, 4, 2)[mask].reshape(2, -1, 96)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(x, mask), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]


def test_classifier_heads_and_drop_path():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 16, 16)
    inbox = torch.rand(2, 32) < 0.3
    for head in ("mean", "mca"):
        clf = build_classifier(TINY, 5, pooling=head, drop_path=0.2, **TINY_SPEC).eval()
        assert clf(x, inbox).shape == (2, 5)
        assert clf(x, inbox).abs().max() < 0.1  # head init scale 0.001 keeps logits small
        assert clf.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
        clf.train()
        assert clf.blocks[-1].drop_path.training
    multi = build_classifier(
        TINY, None, pooling="mca", outputs_by_name={"verb": 4, "noun": 6}, **TINY_SPEC
    )
    out = multi(x, inbox)
    assert out["verb"].shape == (2, 4) and out["noun"].shape == (2, 6)
    assert "head.verb.weight" in multi.state_dict()
    assert "cross_block.attn.q_bias" in multi.state_dict()
    with pytest.raises(ValueError, match="head"):
        build_classifier(TINY, 5, pooling="max")


def test_config_model_builds_and_runs():
    cfg = load_config()["model"]
    clf = build_classifier(cfg, 8, pooling="mca")
    n = math.prod(token_grid(cfg))
    x = torch.randn(1, 3, cfg["num_frames"], cfg["input_size"], cfg["input_size"])
    assert clf(x, torch.rand(1, n) < 0.2).shape == (1, 8)


def test_layer_ids():
    assert layer_id_for_lr_decay("patch_embed.proj.weight", 12) == 0
    assert layer_id_for_lr_decay("encoder.blocks.3.attn.qkv.weight", 12) == 4
    assert layer_id_for_lr_decay("fc_norm.weight", 12) == 13
    assert layer_id_for_lr_decay("cross_block.attn.q_bias", 12) == 13


def test_model_dims_override_the_preset_for_checkpoints_of_another_shape():
    from mofo.config import load_config
    from mofo.models.build import build_classifier

    cfg = load_config(overrides={"model": {"dims": {"embed_dim": 48, "depth": 2, "num_heads": 4}}})
    model = build_classifier(cfg["model"], 3)
    assert len(model.blocks) == 2 and model.blocks[0].attn.qkv.in_features == 48
    cfg["model"]["dims"] = {"embed_dim": 50, "num_heads": 4}
    with pytest.raises(ValueError, match="50 is not divisible by 4"):
        build_classifier(cfg["model"], 3)
