"""Hugging Face VideoMAE checkpoints both ways: a small random transformers model, built here
(no hub), converted to mofo and back, with the outputs compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mofo.cli import main as mofo_main
from mofo.models.build import build_classifier, build_pretrain_model
from mofo.models.checkpoint import CheckpointError, load_pretrained
from mofo.models.hf import HFCheckpointError, export_hf, read_hf_folder

MODEL_CFG = {
    "size": "demo",
    "input_size": 16,
    "num_frames": 4,
    "patch_size": 4,
    "tubelet_size": 2,
    "dims": {"embed_dim": 48, "depth": 2, "num_heads": 3, "decoder_dim": 32,
             "decoder_depth": 1, "decoder_heads": 2},
}
N_TOKENS = 2 * 4 * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_config(**kw):
    from transformers import VideoMAEConfig

    return VideoMAEConfig(
        image_size=16, patch_size=4, num_channels=3, num_frames=4, tubelet_size=2,
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=128, **kw)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norms and biases, so that every term (q/v biases, LN) is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def clips(b: int = 2, seed: int = 1) -> torch.Tensor:
    """Ours: (B, C, T, H, W)."""
    return torch.randn(b, 3, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def tube_mask(b: int = 2) -> torch.Tensor:
    mask = torch.zeros(b, N_TOKENS, dtype=torch.bool)
    mask[:, ::4] = True
    mask[1] = mask[1].roll(1)
    return mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_hf_pretraining_folder_loads_into_mofo(tmp_path: Path):
    from transformers import VideoMAEForPreTraining

    torch.manual_seed(0)
    hf = perturb(VideoMAEForPreTraining(hf_config(use_mean_pooling=False)))
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    ours = build_pretrain_model(MODEL_CFG).eval()
    report = load_pretrained(ours, tmp_path / "hf")
    assert report.checkpoint_format == "pretrain"
    assert not report.missing and not report.unexpected and not report.dropped
    assert any("1e-12" in note for note in report.notes)  # transformers' default eps, noted
    x, mask = clips(), tube_mask()
    with torch.no_grad():
        want = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
        got = ours(x, mask)
    assert got.shape == want.shape and max_diff(got, want) <= 1e-5
    # The same folder as a pretrained encoder for fine-tuning: the decoder is dropped and
    # listed, as for a .pth pretraining checkpoint.
    clf = build_classifier(MODEL_CFG, 5, pooling="mca")
    report = load_pretrained(clf, tmp_path / "hf")
    assert "decoder.head.weight" in report.dropped and "encoder.norm.weight" in report.dropped
    assert not report.missing and "fc_norm.weight" in report.initialised


def test_hf_classifier_folder_loads_into_mofo(tmp_path: Path):
    from transformers import VideoMAEForVideoClassification

    torch.manual_seed(1)
    hf = perturb(VideoMAEForVideoClassification(hf_config(num_labels=5)))
    hf.save_pretrained(tmp_path / "hf")
    ours = build_classifier(MODEL_CFG, 5, pooling="mean").eval()
    report = load_pretrained(ours, tmp_path / "hf")
    assert report.checkpoint_format == "finetune" and not report.missing and not report.unexpected
    x = clips()
    with torch.no_grad():
        assert max_diff(ours(x), hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits) <= 1e-5


def test_old_bias_names_and_a_load_report_of_unknown_keys(tmp_path: Path):
    """Files from before transformers 5 name the biases q_bias / v_bias; unknown keys are
    listed (or raise with strict_report), as for a .pth file."""
    from safetensors.torch import load_file, save_file
    from transformers import VideoMAEForVideoClassification

    torch.manual_seed(2)
    hf = perturb(VideoMAEForVideoClassification(hf_config(num_labels=3)))
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    for key in list(state):
        for new, old in ((".query.bias", ".q_bias"), (".value.bias", ".v_bias")):
            if key.endswith(new):
                state[key[: -len(new)] + old] = state.pop(key)
    state["videomae.extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    ours = build_classifier(MODEL_CFG, 3, pooling="mean").eval()
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_pretrained(ours, tmp_path / "hf")
    report = load_pretrained(ours, tmp_path / "hf", strict_report=False)
    assert report.unexpected == ["extra.weight"] and not report.missing
    x = clips()
    with torch.no_grad():
        assert max_diff(ours(x), hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits) <= 1e-5


def test_mofo_pretraining_model_exports_to_transformers(tmp_path: Path):
    from transformers import VideoMAEForPreTraining

    torch.manual_seed(3)
    ours = perturb(build_pretrain_model(MODEL_CFG))
    export_hf(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["use_mean_pooling"] is False
    hf = VideoMAEForPreTraining.from_pretrained(tmp_path / "out").eval()
    x, mask = clips(seed=4), tube_mask()
    with torch.no_grad():
        want = ours(x, mask)
        got = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits
    assert max_diff(got, want) <= 1e-5
    # ... and back: the round trip gives the same weights.
    again = build_pretrain_model(MODEL_CFG)
    load_pretrained(again, tmp_path / "out")
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_mofo_classifier_exports_to_transformers_via_the_cli(tmp_path: Path):
    from transformers import VideoMAEForVideoClassification

    torch.manual_seed(5)
    ours = perturb(build_classifier(MODEL_CFG, 4, pooling="mean", head_init_scale=1.0))
    torch.save({"model": ours.state_dict(), "epoch": 2}, tmp_path / "checkpoint.pt")
    overlay = tmp_path / "model.yaml"
    overlay.write_text(json.dumps({"model": MODEL_CFG}))
    rc = mofo_main(["export-hf", str(tmp_path / "checkpoint.pt"), str(tmp_path / "out"),
                    "--configfile", str(overlay)])
    assert rc == 0
    hf = VideoMAEForVideoClassification.from_pretrained(tmp_path / "out").eval()
    assert hf.config.num_labels == 4 and hf.config.use_mean_pooling
    x = clips(seed=6)
    with torch.no_grad():
        assert max_diff(hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits, ours(x)) <= 1e-5
    state, _ = read_hf_folder(tmp_path / "out")
    assert "blocks.0.attn.qkv.weight" in state and "head.weight" in state


def test_what_cannot_be_exported(tmp_path: Path):
    with pytest.raises(HFCheckpointError, match="mean pooling only"):
        export_hf(build_classifier(MODEL_CFG, 4, pooling="mca"), tmp_path / "mca")
    model = build_classifier(MODEL_CFG, 4, pooling="mean")
    model.keep_pos_embed()  # a learned position table
    with pytest.raises(HFCheckpointError, match="position table"):
        export_hf(model, tmp_path / "pos")
