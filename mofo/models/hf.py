"""Hugging Face ``transformers`` VideoMAE checkpoints, both ways, without needing transformers.

A Hugging Face VideoMAE folder is ``config.json`` + ``model.safetensors`` (or
``pytorch_model.bin``) of ``VideoMAEForPreTraining``, ``VideoMAEForVideoClassification`` or the
bare ``VideoMAEModel``. :func:`read_hf_folder` renames its weights to mofo's names (the
pretraining format ``encoder.*`` / ``decoder.*``, or the fine-tuned one ``blocks.*`` /
``fc_norm`` / ``head``), so that :func:`mofo.models.checkpoint.load_pretrained` loads a folder
with the same rules and the same :class:`~mofo.models.checkpoint.LoadReport` as a ``.pth``.
:func:`export_hf` writes one of our models (a :class:`PretrainVideoMAE`, or a
:class:`VideoClassifier` with the mean-pooling head) as such a folder.

The two implementations, term by term (``transformers`` 5.x ``modeling_videomae.py``):

* tubelet embedding ``embeddings.patch_embeddings.projection`` = our ``patch_embed.proj``;
  their input is ``(B, T, C, H, W)``, ours ``(B, C, T, H, W)``;
* position table: the same fixed sine-cosine table (theirs a plain tensor, in no state dict);
  a learned table of ours cannot be exported;
* attention: separate ``query`` / ``key`` / ``value`` linears with q and v biases and no k
  bias (``qv_bias``) = our fused ``qkv.weight`` with ``q_bias`` / ``v_bias``; older files
  name the biases ``attention.attention.q_bias`` / ``v_bias`` (both are read);
* pre-norm layers ``layernorm_before`` / ``layernorm_after`` with ``layer_norm_eps`` (their
  default 1e-12; ours 1e-6 everywhere, so the export writes 1e-6), exact GELU MLP
  ``intermediate.dense`` / ``output.dense``;
* ``use_mean_pooling``: true = no final encoder norm and ``fc_norm`` after the token mean (our
  classifiers); false = a final ``videomae.layernorm`` (our pretraining encoder's ``norm``);
* decoder ``decoder.decoder_layers.*``, ``decoder.norm``, ``decoder.head``, plus
  ``encoder_to_decoder`` and ``mask_token``: the same names as ours after ``decoder.blocks``.

``fc_norm`` and ``decoder.norm`` are ``nn.LayerNorm(width)`` in transformers, eps 1e-5 and not
configurable, where ours use 1e-6: the one difference the export cannot remove. It changes a
normalised feature by a relative ~(1e-5 - 1e-6) / (2 var), i.e. ~5e-6 / var: below 1e-5 for
features of unit variance, nothing for trained models. Loading a folder gives the model the
folder's epsilons (:func:`match_hf_norm_eps`) and lists them in the load report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mofo.models.heads import MeanPoolHead
from mofo.models.layers import LAYER_NORM_EPS
from mofo.models.vit import PretrainVideoMAE, VideoClassifier, VideoEncoder

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_FIXED_NORM_EPS = 1e-5  # transformers' fc_norm and decoder.norm: nn.LayerNorm(width)

# Inside one transformer layer: HF name -> ours (the q/k/v linears are fused separately).
_LAYER_NAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_QKV = re.compile(r"attention\.attention\.(query|key|value)\.(weight|bias)$")
_OLD_BIAS = re.compile(r"attention\.attention\.(q_bias|v_bias)$")


class HFCheckpointError(RuntimeError):
    """A folder is not a VideoMAE checkpoint mofo can read, or a model cannot be exported."""


def is_hf_folder(path: str | Path) -> bool:
    """A folder with ``config.json`` (a Hugging Face checkpoint), not a ``.pth`` file."""
    path = Path(path)
    return path.is_dir() and (path / HF_CONFIG).is_file()


def _read_weights(folder: Path) -> dict[str, Tensor]:
    for name in HF_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    raise HFCheckpointError(f"{folder}: no {' or '.join(HF_WEIGHTS)} next to {HF_CONFIG}")


def _convert_layers(state: Mapping[str, Tensor], hf_prefix: str, ours: str) -> dict[str, Tensor]:
    """``{hf_prefix}.{i}.<layer>`` -> ``{ours}.{i}.<block>`` for every layer in ``state``."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], Tensor] = {}
    pattern = re.compile(rf"^{re.escape(hf_prefix)}\.(\d+)\.(.+)$")
    for key, value in state.items():
        m = pattern.match(key)
        if not m:
            continue
        i, rest = int(m[1]), m[2]
        if q := _QKV.match(rest):
            kind, what = q[1], q[2]
            if what == "weight":
                qkv[(i, kind)] = value
            elif kind == "key":
                raise HFCheckpointError(f"{key}: a key bias (mofo's attention has none)")
            else:
                out[f"{ours}.{i}.attn.{kind[0]}_bias"] = value
            continue
        if b := _OLD_BIAS.match(rest):
            out[f"{ours}.{i}.attn.{b[1]}"] = value
            continue
        for hf_name, our_name in _LAYER_NAMES.items():
            if rest.startswith(hf_name + "."):
                out[f"{ours}.{i}.{our_name}{rest[len(hf_name) :]}"] = value
                break
        else:
            out[f"{hf_prefix}.{i}.{rest}"] = value  # unknown: reported as unexpected
    for i in sorted({i for i, _ in qkv}):
        parts = [qkv.get((i, kind)) for kind in ("query", "key", "value")]
        if any(p is None for p in parts):
            raise HFCheckpointError(f"{hf_prefix}.{i}: query, key and value weights needed")
        out[f"{ours}.{i}.attn.qkv.weight"] = torch.cat(parts, 0)
    return out


def hf_to_mofo_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Rename a VideoMAE state dict to mofo's names; returns it and its format.

    ``"pretrain"`` (``encoder.*``, ``decoder.*``: a ``VideoMAEForPreTraining``) or
    ``"finetune"`` (bare names, ``fc_norm``, ``head``: a classifier or a bare ``VideoMAEModel``).
    """
    state = {k.removeprefix("videomae."): v for k, v in state.items()}
    pretrain = any(k.startswith(("decoder.", "encoder_to_decoder.", "mask_token")) for k in state)
    enc = "encoder." if pretrain else ""
    out = _convert_layers(state, "encoder.layer", f"{enc}blocks")
    out.update(_convert_layers(state, "decoder.decoder_layers", "decoder.blocks"))
    renames = {
        "embeddings.patch_embeddings.projection.": f"{enc}patch_embed.proj.",
        "layernorm.": f"{enc}norm.",
        "fc_norm.": "fc_norm.",
        "classifier.": "head.",
        "encoder_to_decoder.": "encoder_to_decoder.",
        "decoder.norm.": "decoder.norm.",
        "decoder.head.": "decoder.head.",
    }
    for key, value in state.items():
        if key.startswith(("encoder.layer.", "decoder.decoder_layers.")):
            continue
        if key == "mask_token":
            out[key] = value
            continue
        for hf_name, our_name in renames.items():
            if key.startswith(hf_name):
                out[our_name + key[len(hf_name) :]] = value
                break
        else:
            out[key] = value  # unknown: load_pretrained reports it as unexpected
    return out, "pretrain" if pretrain else "finetune"


def read_hf_folder(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights of a Hugging Face VideoMAE folder in mofo's names, and its ``config.json``."""
    folder = Path(folder)
    config = json.loads((folder / HF_CONFIG).read_text())
    if config.get("model_type", "videomae") != "videomae":
        raise HFCheckpointError(f"{folder}: model_type {config.get('model_type')!r}, not videomae")
    state, _ = hf_to_mofo_state(_read_weights(folder))
    return state, config


def match_hf_norm_eps(config: Mapping[str, Any], model: nn.Module) -> list[str]:
    """Give ``model``'s LayerNorms the folder's epsilons, so that it computes what transformers
    computes; returns notes for the load report.

    The blocks and the final encoder norm take ``layer_norm_eps`` (transformers' default
    1e-12); ``fc_norm`` and ``decoder.norm`` take 1e-5 (fixed in transformers). The eps is not
    part of a state dict: a ``checkpoint.pt`` saved later loads with mofo's 1e-6 again.
    """
    notes = []
    eps = float(config.get("layer_norm_eps", 1e-12))
    changed: dict[float, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.LayerNorm):
            continue
        fixed = name == "fc_norm" or name.endswith("decoder.norm")
        target = HF_FIXED_NORM_EPS if fixed else eps
        if module.eps != target:
            module.eps = target
            changed[target] = changed.get(target, 0) + 1
    for target, count in sorted(changed.items()):
        notes.append(
            f"LayerNorm eps set to the folder's {target:g} in {count} norms (mofo: "
            f"{LAYER_NORM_EPS:g}; a checkpoint.pt saved later loads with mofo's)"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        notes.append(f"hidden_act {config['hidden_act']!r} in the folder, mofo uses exact gelu")
    archs = config.get("architectures") or []
    if "VideoMAEForVideoClassification" in archs and config.get("use_mean_pooling") is False:
        notes.append("use_mean_pooling false: the folder's classifier reads token 0, not a mean")
    return notes


def _to_hf_layers(state: Mapping[str, Tensor], ours: str, hf_prefix: str, dim: int) -> dict:
    out: dict[str, Tensor] = {}
    pattern = re.compile(rf"^{re.escape(ours)}\.(\d+)\.(.+)$")
    reverse = {v: k for k, v in _LAYER_NAMES.items()}
    for key, value in state.items():
        m = pattern.match(key)
        if not m:
            continue
        i, rest = m[1], m[2]
        base = f"{hf_prefix}.{i}.attention.attention"
        if rest == "attn.qkv.weight":
            q, k, v = value.split(dim, 0)
            out.update(
                {f"{base}.query.weight": q, f"{base}.key.weight": k, f"{base}.value.weight": v}
            )
        elif rest in ("attn.q_bias", "attn.v_bias"):
            out[f"{base}.{'query' if rest == 'attn.q_bias' else 'value'}.bias"] = value
        else:
            for our_name, hf_name in reverse.items():
                if rest.startswith(our_name + "."):
                    out[f"{hf_prefix}.{i}.{hf_name}{rest[len(our_name) :]}"] = value
                    break
            else:
                raise HFCheckpointError(f"{key}: no transformers name for it")
    return out


def hf_config_for(model: nn.Module) -> dict[str, Any]:
    """``config.json`` of the transformers model matching ``model``."""
    encoder = model.encoder if isinstance(model, PretrainVideoMAE) else model
    if not isinstance(encoder, VideoEncoder):
        raise HFCheckpointError(f"cannot export a {type(model).__name__}")
    spec = encoder.spec
    config: dict[str, Any] = {
        "model_type": "videomae",
        "image_size": encoder.input_size,
        "patch_size": encoder.patch_size,
        "num_channels": encoder.patch_embed.proj.in_channels,
        "num_frames": encoder.num_frames,
        "tubelet_size": encoder.tubelet_size,
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": int(spec.embed_dim * spec.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,  # transformers' default is 1e-12; ours is 1e-6
        "qv_bias": True,
        "decoder_hidden_size": spec.decoder_dim,
        "decoder_num_hidden_layers": spec.decoder_depth,
        "decoder_num_attention_heads": spec.decoder_heads,
        "decoder_intermediate_size": int(spec.decoder_dim * spec.mlp_ratio),
        "norm_pix_loss": True,
        "torch_dtype": "float32",
    }
    if isinstance(model, PretrainVideoMAE):
        config.update(architectures=["VideoMAEForPreTraining"], use_mean_pooling=False)
    elif not isinstance(model, VideoClassifier):
        raise HFCheckpointError(f"cannot export a bare {type(model).__name__} (no head)")
    else:
        if not isinstance(model.pool_head, MeanPoolHead):
            raise HFCheckpointError(
                f"transformers' VideoMAEForVideoClassification has mean pooling only; this "
                f"classifier has a {model.head_kind} (export its pretrained encoder instead)"
            )
        if isinstance(model.head, nn.ModuleDict):
            raise HFCheckpointError("a multi-output head (verb + noun) has no transformers class")
        n = model.head.out_features
        config.update(
            architectures=["VideoMAEForVideoClassification"],
            use_mean_pooling=True,
            id2label={str(i): f"LABEL_{i}" for i in range(n)},
            label2id={f"LABEL_{i}": i for i in range(n)},
        )
    return config


def mofo_to_hf_state(model: nn.Module) -> dict[str, Tensor]:
    """Our model's weights under transformers' names (``videomae.*`` ...)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    learned = [k for k in state if k.endswith("pos_embed")]
    if learned:
        raise HFCheckpointError(
            f"{learned}: a learned position table; transformers' VideoMAE has the fixed one only"
        )
    pretrain = isinstance(model, PretrainVideoMAE)
    enc = "encoder." if pretrain else ""
    dim = (model.encoder if pretrain else model).embed_dim
    out = _to_hf_layers(state, f"{enc}blocks", "videomae.encoder.layer", dim)
    out["videomae.embeddings.patch_embeddings.projection.weight"] = state[
        f"{enc}patch_embed.proj.weight"
    ]
    out["videomae.embeddings.patch_embeddings.projection.bias"] = state[
        f"{enc}patch_embed.proj.bias"
    ]
    if pretrain:
        out.update(
            _to_hf_layers(
                state,
                "decoder.blocks",
                "decoder.decoder_layers",
                model.decoder.norm.normalized_shape[0],
            )
        )
        for key in ("norm.weight", "norm.bias"):
            out[f"videomae.layer{key}"] = state[f"encoder.{key}"]
        for key in (
            "encoder_to_decoder.weight",
            "mask_token",
            "decoder.norm.weight",
            "decoder.norm.bias",
            "decoder.head.weight",
            "decoder.head.bias",
        ):
            out[key] = state[key]
    else:
        for key in ("weight", "bias"):
            out[f"fc_norm.{key}"] = state[f"fc_norm.{key}"]
            out[f"classifier.{key}"] = state[f"head.{key}"]
    return out


def export_hf(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model`` as a transformers VideoMAE folder (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    config = hf_config_for(model)
    state = mofo_to_hf_state(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
