"""Checkpoint loading: official VideoMAE key layouts, pos_embed, shapes, head re-init, files."""

from __future__ import annotations

import argparse

import pytest
import torch

from mofo.models import CheckpointError, build_classifier, build_pretrain_model, load_pretrained
from mofo.models.layers import sincos_position_table

BASE_CFG = {
    "size": "base",
    "input_size": 224,
    "num_frames": 16,
    "sampling_rate": 2,
    "patch_size": 16,
    "tubelet_size": 2,
}
TINY = {
    "size": "demo",
    "input_size": 16,
    "num_frames": 4,
    "sampling_rate": 1,
    "patch_size": 4,
    "tubelet_size": 2,
}
TINY_SPEC = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "decoder_dim": 16,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def official_blocks(prefix: str, depth: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of VideoMAE's transformer blocks (written out from its modeling files)."""
    shapes = {}
    for i in range(depth):
        p = f"{prefix}blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.q_bias": (dim,),
                p + "attn.v_bias": (dim,),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (4 * dim, dim),
                p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.fc2.weight": (dim, 4 * dim),
                p + "mlp.fc2.bias": (dim,),
            }
        )
    return shapes


def official_vit_b_finetune(num_classes=174) -> dict[str, tuple[int, ...]]:
    shapes = {"patch_embed.proj.weight": (768, 3, 2, 16, 16), "patch_embed.proj.bias": (768,)}
    shapes.update(official_blocks("", 12, 768))
    shapes.update(
        {
            "fc_norm.weight": (768,),
            "fc_norm.bias": (768,),
            "head.weight": (num_classes, 768),
            "head.bias": (num_classes,),
        }
    )
    return shapes


def official_vit_b_pretrain() -> dict[str, tuple[int, ...]]:
    shapes = {
        "encoder.patch_embed.proj.weight": (768, 3, 2, 16, 16),
        "encoder.patch_embed.proj.bias": (768,),
    }
    shapes.update(official_blocks("encoder.", 12, 768))
    shapes.update(
        {
            "encoder.norm.weight": (768,),
            "encoder.norm.bias": (768,),
            "encoder_to_decoder.weight": (384, 768),
            "mask_token": (1, 1, 384),
        }
    )
    shapes.update(official_blocks("decoder.", 4, 384))
    shapes.update(
        {
            "decoder.norm.weight": (384,),
            "decoder.norm.bias": (384,),
            "decoder.head.weight": (1536, 384),
            "decoder.head.bias": (1536,),
        }
    )
    return shapes


def meta_state(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_vit_b_finetune_checkpoint_loads_completely():
    with torch.device("meta"):
        model = build_classifier(BASE_CFG, 174)
    report = load_pretrained(model, {"model": meta_state(official_vit_b_finetune())})
    assert report.checkpoint_format == "finetune"
    assert not report.missing and not report.unexpected and not report.dropped
    assert not report.initialised and not report.reinitialised_head
    assert set(report.loaded) == set(official_vit_b_finetune())


def test_vit_b_pretrain_checkpoint_into_classifier_and_pretrain_model():
    with torch.device("meta"):
        clf = build_classifier(BASE_CFG, 174, pooling="mca")
        pre = build_pretrain_model(BASE_CFG)
    state = meta_state(official_vit_b_pretrain())
    report = load_pretrained(clf, {"module": state})
    assert report.checkpoint_format == "pretrain"
    assert not report.missing and not report.unexpected
    assert "encoder.norm.weight" in report.dropped and "decoder.head.weight" in report.dropped
    assert {k.split(".")[0] for k in report.initialised} == {"fc_norm", "head", "cross_block"}
    report = load_pretrained(pre, state)  # bare state dict
    assert not report.missing and not report.unexpected and not report.dropped
    assert set(report.loaded) == set(official_vit_b_pretrain())


def tiny_pretrain_state(seed=0):
    torch.manual_seed(seed)
    return build_pretrain_model(TINY, **TINY_SPEC).state_dict()


def test_pretrain_weights_arrive_in_the_classifier(tmp_path):
    state = tiny_pretrain_state()
    path = tmp_path / "checkpoint-199.pth"
    # VideoMAE's training checkpoints also pickle the run's argparse Namespace.
    torch.save({"model": state, "epoch": 199, "args": argparse.Namespace(lr=1.5e-4)}, path)
    clf = build_classifier(TINY, 3, **TINY_SPEC)
    report = load_pretrained(clf, path)
    assert report.source == str(path)
    assert torch.equal(clf.blocks[1].attn.q_bias, state["encoder.blocks.1.attn.q_bias"])
    assert torch.equal(clf.patch_embed.proj.weight, state["encoder.patch_embed.proj.weight"])
    assert report.pos_embed == {"pos_embed": "absent (fixed sine-cosine)"}


def test_pos_embed_verified_loaded_or_rejected():
    state = tiny_pretrain_state()
    n, d = 32, 32
    clf = build_classifier(TINY, 3, **TINY_SPEC)
    ok = {**state, "encoder.pos_embed": sincos_position_table(n, d)}
    assert load_pretrained(clf, ok).pos_embed["pos_embed"].startswith("verified")
    learned = torch.randn(1, n, d)
    report = load_pretrained(clf, {**state, "encoder.pos_embed": learned})
    assert report.pos_embed["pos_embed"].startswith("loaded")
    assert torch.equal(clf.pos_embed, learned)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(1, 33, 32\)"):
        load_pretrained(clf, {**state, "encoder.pos_embed": torch.randn(1, n + 1, d)})


def test_learned_pos_embed_survives_state_dict_and_reload(tmp_path):
    """A learned table loaded from an outside file is saved with the weights (issue 9)."""
    torch.manual_seed(0)
    n, d = 32, 32
    learned = torch.randn(1, n, d)
    clf = build_classifier(TINY, 3, **TINY_SPEC)
    load_pretrained(clf, {**tiny_pretrain_state(), "encoder.pos_embed": learned})
    saved = clf.state_dict()
    assert torch.equal(saved["pos_embed"], learned)
    torch.save({"model": saved}, tmp_path / "ft.pt")
    fresh = build_classifier(TINY, 3, **TINY_SPEC)
    fresh.load_state_dict(torch.load(tmp_path / "ft.pt", weights_only=True)["model"])
    assert torch.equal(fresh.pos_embed, learned)
    x = torch.randn(2, 3, 4, 16, 16)
    clf.eval(), fresh.eval()
    assert torch.equal(fresh(x), clf(x))
    # ... and goes on into the next save, and through load_pretrained (fine-tuned format).
    assert torch.equal(fresh.state_dict()["pos_embed"], learned)
    again = build_classifier(TINY, 3, **TINY_SPEC)
    report = load_pretrained(again, saved)
    assert "pos_embed" in report.loaded and not report.initialised
    assert torch.equal(again.pos_embed, learned)
    # Without a learned table nothing changes: VideoMAE's layout, no pos_embed key.
    plain = build_classifier(TINY, 3, **TINY_SPEC).state_dict()
    assert "pos_embed" not in plain
    build_classifier(TINY, 3, **TINY_SPEC).load_state_dict(plain)


def test_learned_pos_embeds_of_the_pretraining_model_survive_reload():
    torch.manual_seed(0)
    model = build_pretrain_model(TINY, **TINY_SPEC)
    state = {k: v for k, v in model.state_dict().items()}
    enc, dec = torch.randn(1, 32, 32), torch.randn(1, 32, 16)
    report = load_pretrained(model, {**state, "encoder.pos_embed": enc, "pos_embed": dec})
    assert report.pos_embed == {
        "pos_embed": "loaded (learned table differs from sine-cosine)",
        "encoder.pos_embed": "loaded (learned table differs from sine-cosine)",
    }
    fresh = build_pretrain_model(TINY, **TINY_SPEC)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.encoder.pos_embed, enc)
    assert torch.equal(fresh.pos_embed, dec)


def test_evaluation_uses_the_learned_pos_embed_of_a_finetuned_checkpoint(tmp_path):
    from mofo.evaluation.evaluate import load_finetuned

    model_cfg = {**TINY, "size": "demo"}
    config = {
        "model": model_cfg,
        "finetune": {"drop_path": 0.0, "head_init_scale": 0.001, "fc_dropout": 0.0,
                     "mean_drop_ratio": 0.0},
    }
    torch.manual_seed(0)
    clf = build_classifier(model_cfg, 3, pooling="mean")
    learned = torch.randn_like(clf.pos_embed)
    load_pretrained(clf, {**clf.state_dict(), "pos_embed": learned})
    path = tmp_path / "checkpoint.pt"
    meta = {"finetune_head": "mean", "heads": {"label": 3}}
    torch.save({"model": clf.state_dict(), "meta": meta}, path)
    model, _ = load_finetuned(config, path, "mean", {"label": 3})
    assert torch.equal(model.pos_embed, learned)


def test_head_reinitialised_when_classes_differ_other_mismatch_is_error():
    torch.manual_seed(0)
    source = build_classifier(TINY, 5, **TINY_SPEC).state_dict()
    target = build_classifier(TINY, 3, **TINY_SPEC)
    head_before = target.head.weight.clone()
    report = load_pretrained(target, source)
    assert sorted(report.reinitialised_head) == ["head.bias", "head.weight"]
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.fc_norm.weight, source["fc_norm.weight"])
    bad = dict(source)
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    with pytest.raises(
        CheckpointError, match=r"blocks.0.mlp.fc1.weight has shape \(7, 32\).*\(128, 32\)"
    ):
        load_pretrained(target, bad)


def test_missing_and_unexpected_keys():
    state = dict(tiny_pretrain_state())
    del state["encoder.blocks.1.norm2.bias"]
    state["encoder.blocks.1.gamma_1"] = torch.ones(32)
    clf = build_classifier(TINY, 3, **TINY_SPEC)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.norm2\.bias"):
        load_pretrained(clf, state)
    report = load_pretrained(clf, state, strict_report=False)
    assert report.missing == ["blocks.1.norm2.bias"]
    assert report.unexpected == ["blocks.1.gamma_1"]


def test_bad_files(tmp_path):
    clf = build_classifier(TINY, 3, **TINY_SPEC)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(clf, tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_pretrained(clf, junk)
