"""Models from the config: the encoder, the pretraining autoencoder and the classifiers.

``build_encoder`` / ``build_pretrain_model`` / ``build_classifier`` take the ``model`` config
section; :func:`build_model` takes the whole config and makes the fine-tuning classifier the
way fine-tuning and evaluation both need it (``finetune`` section: drop path, head init scale,
dropout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from mofo.models.heads import MeanPoolHead, MotionCrossAttentionHead
from mofo.models.layers import init_trunc_normal
from mofo.models.vit import PretrainVideoMAE, VideoClassifier, VideoEncoder, ViTSpec, model_spec


def _spec_from_cfg(model_cfg: Mapping[str, Any], overrides: dict[str, Any]) -> ViTSpec:
    """``model.size``'s preset with ``model.dims`` (explicit widths/depths, e.g. for a checkpoint
    of another shape) and then the caller's ``overrides`` on top."""
    spec_keys = set(ViTSpec.__dataclass_fields__)
    dims = dict(model_cfg.get("dims") or {})
    dims.update({k: overrides.pop(k) for k in list(overrides) if k in spec_keys})
    spec = model_spec(model_cfg["size"], **dims)
    for dim, heads in ((spec.embed_dim, spec.num_heads), (spec.decoder_dim, spec.decoder_heads)):
        if dim % heads:
            raise ValueError(f"model.dims: width {dim} is not divisible by {heads} attention heads")
    return spec


def build_encoder(
    model_cfg: Mapping[str, Any], drop_path: float = 0.0, final_norm: bool = True, **overrides: Any
) -> VideoEncoder:
    """A bare encoder (features only) from the ``model`` config section."""
    overrides = dict(overrides)
    spec = _spec_from_cfg(model_cfg, overrides)
    encoder = VideoEncoder(
        spec,
        model_cfg["input_size"],
        model_cfg["num_frames"],
        model_cfg["patch_size"],
        model_cfg["tubelet_size"],
        drop_path=drop_path,
        final_norm=final_norm,
        **overrides,
    )
    encoder.apply(init_trunc_normal)
    return encoder


def build_pretrain_model(model_cfg: Mapping[str, Any], **overrides: Any) -> PretrainVideoMAE:
    """VideoMAE pretraining model from the ``model`` config section.

    ``overrides``: any :class:`ViTSpec` field (``decoder_depth=...``), ``drop_path``, ``in_chans``.
    """
    overrides = dict(overrides)
    spec = _spec_from_cfg(model_cfg, overrides)
    return PretrainVideoMAE(
        spec,
        model_cfg["input_size"],
        model_cfg["num_frames"],
        model_cfg["patch_size"],
        model_cfg["tubelet_size"],
        **overrides,
    )


def build_classifier(
    model_cfg: Mapping[str, Any],
    num_classes: int | None,
    pooling: str = "mean",
    drop_path: float = 0.1,
    head_init_scale: float = 0.001,
    outputs_by_name: Mapping[str, int] | None = None,
    fc_dropout: float = 0.0,
    mca_attention_heads: int | None = None,
    mean_drop_ratio: float = 0.0,
    **overrides: Any,
) -> VideoClassifier:
    """Fine-tuning classifier from the ``model`` config section.

    ``pooling``: the pooling head, ``"mean"`` (VideoMAE mean pooling) or ``"mca"`` (MOFO motion
    cross-attention) -- the variants' ``head``. Names: "pooling" is how tokens become one
    feature, "outputs" the linear layers on it, "attention heads" the heads of an attention.
    ``outputs_by_name``: several linear outputs on the same pooled feature, e.g.
    ``{"verb": 97, "noun": 300}`` for EPIC-KITCHENS (``num_classes`` is then ignored).
    ``mca_attention_heads``: attention heads of the MCA block (default 3 as in MOFO, or the encoder's
    head count when the width is not divisible by 3). ``mean_drop_ratio``: the mean head's
    EVEREST option, the fraction of least-moving tokens dropped before the encoder (0 = off;
    not used by the MCA head). ``overrides``: :class:`ViTSpec` fields.
    """
    overrides = dict(overrides)
    spec = _spec_from_cfg(model_cfg, overrides)
    outputs: int | dict[str, int]
    if outputs_by_name:
        outputs = dict(outputs_by_name)
    elif num_classes is not None and num_classes > 0:
        outputs = int(num_classes)
    else:
        raise ValueError(f"build_classifier: num_classes must be > 0, got {num_classes!r}")
    if pooling == "mean":
        pool: nn.Module = MeanPoolHead(
            spec.embed_dim, outputs, fc_dropout, head_init_scale, mean_drop_ratio
        )
    elif pooling == "mca":
        attention_heads = mca_attention_heads or (3 if spec.embed_dim % 3 == 0 else spec.num_heads)
        pool = MotionCrossAttentionHead(
            spec.embed_dim, outputs, attention_heads, spec.mlp_ratio, drop_path, fc_dropout, head_init_scale
        )
    else:
        raise ValueError(f"unknown pooling head {pooling!r}; choose 'mean' or 'mca'")
    return VideoClassifier(
        spec,
        model_cfg["input_size"],
        model_cfg["num_frames"],
        model_cfg["patch_size"],
        model_cfg["tubelet_size"],
        pool,
        drop_path=drop_path,
        **overrides,
    )


def build_model(config: Mapping[str, Any], outputs: Mapping[str, int], pooling: str) -> VideoClassifier:
    """The classifier for ``outputs`` (class counts by name: ``{"label": C}`` or verb/noun)
    with the ``pooling`` head (``mean`` / ``mca``).

    Drop path, head init scale, dropout and the mean head's token drop ratio come from the
    ``finetune`` section.
    """
    ft = config["finetune"]
    multi = None if list(outputs) == ["label"] else dict(outputs)
    return build_classifier(
        config["model"],
        outputs.get("label"),
        pooling=pooling,
        drop_path=float(ft["drop_path"]),
        head_init_scale=float(ft["head_init_scale"]),
        outputs_by_name=multi,
        fc_dropout=float(ft["fc_dropout"]),
        mean_drop_ratio=float(ft["mean_drop_ratio"]),
    )
