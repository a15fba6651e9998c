"""The VideoMAE vision transformer: tubelet embedding, encoder, pretraining decoder, classifier.

Built on timm's layers (``Mlp``, ``DropPath``, ``trunc_normal_``) and PyTorch's fused
``scaled_dot_product_attention``. Parameter names follow the official VideoMAE / MOFO
checkpoints (``patch_embed.proj.weight``, ``blocks.0.attn.q_bias``, ``fc_norm.weight``,
``encoder.blocks...``, ``encoder_to_decoder.weight``, ``mask_token``, ``decoder.head.weight``)
so that those files load without renaming (see :mod:`mofo.models.checkpoint`).

Token order is VideoMAE's: the Conv3d output flattened over (t, h, w), i.e. token
``n = (ti * h + hi) * w + wi``. Masks, in-box flags and pixel targets all use this order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn

from mofo.masking.grid import token_grid

LAYER_NORM_EPS = 1e-6  # VideoMAE uses LayerNorm(eps=1e-6) everywhere


@dataclass(frozen=True)
class ViTSpec:
    """Widths and depths of one model size (encoder and pretraining decoder)."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mlp_ratio: float = 4.0


# Encoder sizes are ViT's; decoder widths/heads are VideoMAE's (ViT-S 192/3, ViT-B 384/6,
# ViT-L 512/8) with its default depth 4. "tiny" follows the half-width pattern. "demo" is sized
# for the 2-CPU demo (2 pretrainings + 4 fine-tunings in minutes); 96 = 3 x 32 so that the
# 3-head MCA block divides it.
MODEL_SIZES: dict[str, ViTSpec] = {
    "demo": ViTSpec(96, 4, 3, 64, 2, 2),
    "tiny": ViTSpec(192, 12, 3, 96, 4, 3),
    "small": ViTSpec(384, 12, 6, 192, 4, 3),
    "base": ViTSpec(768, 12, 12, 384, 4, 6),
    "large": ViTSpec(1024, 24, 16, 512, 4, 8),
}


def model_spec(size: str, **overrides: Any) -> ViTSpec:
    """The :class:`ViTSpec` of ``size`` with any field replaced by ``overrides``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model.size: unknown size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    unknown = set(overrides) - set(ViTSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)} for size {size!r}")
    return replace(MODEL_SIZES[size], **overrides)


def sincos_position_table(num_positions: int, dim: int) -> Tensor:
    """VideoMAE's fixed 1-D sine-cosine table over all tokens, shape ``(1, num_positions, dim)``.

    Entry ``[p, j] = sin/cos(p / 10000 ** (2 * (j // 2) / dim))`` with sin on even and cos on
    odd ``j``; computed in float64 so that it matches the numpy table in released checkpoints.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


def patchify(videos: Tensor, patch_size: int, tubelet_size: int) -> Tensor:
    """Cut ``(B, C, T, H, W)`` clips into tokens ``(B, N, tubelet * patch * patch * C)``.

    Token order matches the encoder; within a token the values are ordered (frame, row,
    column, channel) as in VideoMAE's pixel targets, which is what the decoder ``head`` predicts.
    """
    b, c, t, h, w = videos.shape
    x = videos.reshape(
        b,
        c,
        t // tubelet_size,
        tubelet_size,
        h // patch_size,
        patch_size,
        w // patch_size,
        patch_size,
    )
    # (b, c, t', p0, h', p1, w', p2) -> (b, t', h', w', p0, p1, p2, c)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, -1, tubelet_size * patch_size * patch_size * c)


def pixel_targets(
    videos: Tensor,
    patch_size: int,
    tubelet_size: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """VideoMAE's reconstruction targets ``(B, N, tubelet*patch*patch*C)`` in float32.

    ``mean``/``std`` (per channel) undo the input normalisation first. With ``normalize`` each
    token is standardised per channel over its tubelet*patch*patch pixels (unbiased std + eps),
    as VideoMAE's default loss does. Select the masked rows with ``targets[mask]``.
    """
    x = videos.float()
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1, 1)
        x = x * torch.tensor(std, device=x.device).view(shape)
        x = x + torch.tensor(mean, device=x.device).view(shape)
    tokens = patchify(x, patch_size, tubelet_size)
    if not normalize:
        return tokens
    b, n, _ = tokens.shape
    per_channel = tokens.reshape(b, n, -1, videos.shape[1])  # (B, N, pixels, C)
    mu = per_channel.mean(dim=-2, keepdim=True)
    sigma = per_channel.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return ((per_channel - mu) / (sigma + eps)).reshape(b, n, -1)


def layer_id_for_lr_decay(name: str, num_layers: int) -> int:
    """Layer index of a parameter for layer-wise lr decay (VideoMAE/BEiT rule).

    Embeddings are layer 0, ``blocks.i`` is layer ``i + 1``, everything after the blocks (norms,
    heads, the MCA block) is layer ``num_layers + 1``. A leading ``encoder.`` is ignored.
    """
    name = name.removeprefix("module.").removeprefix("encoder.")
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


class PatchEmbed3D(nn.Module):
    """Tubelet embedding: one Conv3d with kernel = stride = (tubelet, patch, patch)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        k = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, t, h, w) -> (B, t*h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases but no k bias (VideoMAE/BEiT).

    ``attn_mask`` (bool, True = may attend) broadcasts to ``(B, heads, N_query, N_key)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # Separate q/v biases (no k bias: it cancels in the softmax) keep the checkpoint names.
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self) -> Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``drop_path`` over the blocks (VideoMAE)."""
    # Plain Python (not torch.linspace(...).item()) so that models also build on the meta device.
    return [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def init_trunc_normal(module: nn.Module) -> None:
    """Fine-tuning init (VideoMAE): linear weights ~ N(0, .02) truncated, zero biases, unit LN."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_xavier(module: nn.Module) -> None:
    """Pretraining init (VideoMAE/MAE): Xavier-uniform linear weights, zero biases, unit LN."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VideoEncoder(nn.Module):
    """ViT encoder over tubelet tokens with a fixed sine-cosine position table.

    ``forward_features(x, mask)`` returns the tokens ``(B, N_visible, D)`` after the blocks and
    ``norm``; ``mask`` (bool ``(B, N)``, True = hidden) drops the masked tokens before the
    blocks and must hide the same number of tokens in every clip. ``final_norm=False`` makes
    ``norm`` an identity, as VideoMAE's classifiers do (they normalise after pooling instead).
    """

    def __init__(
        self,
        spec: ViTSpec,
        input_size: int,
        num_frames: int,
        patch_size: int,
        tubelet_size: int,
        in_chans: int = 3,
        drop_path: float = 0.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        final_norm: bool = True,
    ):
        super().__init__()
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.grid = token_grid(
            {
                "input_size": input_size,
                "num_frames": num_frames,
                "patch_size": patch_size,
                "tubelet_size": tubelet_size,
            }
        )
        self.input_size, self.num_frames = input_size, num_frames
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.num_patches = math.prod(self.grid)
        self.patch_embed = PatchEmbed3D(in_chans, spec.embed_dim, patch_size, tubelet_size)
        # Fixed, not trained, not saved (VideoMAE keeps it out of its checkpoints as well).
        self.register_buffer(
            "pos_embed", sincos_position_table(self.num_patches, spec.embed_dim), persistent=False
        )
        self.blocks = nn.ModuleList(
            Block(spec.embed_dim, spec.num_heads, spec.mlp_ratio, True, drop, attn_drop, rate)
            for rate in _drop_path_rates(drop_path, spec.depth)
        )
        self.norm = (
            nn.LayerNorm(spec.embed_dim, eps=LAYER_NORM_EPS) if final_norm else nn.Identity()
        )

    def get_num_layers(self) -> int:
        return len(self.blocks)

    def check_input(self, x: Tensor) -> None:
        expected = (self.num_frames, self.input_size, self.input_size)
        if x.ndim != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"expected clips (B, C, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}"
            )

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self.check_input(x)
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        if mask is not None:
            x = x[~mask].reshape(x.shape[0], -1, x.shape[-1])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.forward_features(x, mask)


def check_equal_mask_counts(mask: Tensor, num_tokens: int) -> int:
    """Number of masked tokens per clip; raises unless it is the same for every clip."""
    if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != num_tokens:
        raise ValueError(
            f"mask must be bool (B, {num_tokens}), got {mask.dtype} {tuple(mask.shape)}"
        )
    counts = mask.sum(1)
    if mask.shape[0] and not bool((counts == counts[0]).all()):
        raise ValueError(f"every clip must mask the same number of tokens, got {counts.tolist()}")
    return int(counts[0]) if mask.shape[0] else 0


class PretrainDecoder(nn.Module):
    """VideoMAE's light decoder: blocks, ``norm`` and ``head`` to tubelet*patch*patch*3 pixels."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, True, 0.0, 0.0, rate)
            for rate in _drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, num_predicted: int) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, x.shape[1] - num_predicted :]))


class PretrainVideoMAE(nn.Module):
    """Masked video autoencoder (VideoMAE): encoder on visible tokens, decoder predicts pixels.

    ``forward(x, mask)`` with clips ``(B, 3, T, H, W)`` and ``mask`` bool ``(B, N)`` (True =
    masked, same count in every clip) returns ``(B, N_masked, tubelet*patch*patch*3)``: the
    predictions for the masked tokens in ascending token order, i.e. aligned with
    ``patchify(x, ...)[mask].reshape(B, N_masked, -1)``.
    """

    def __init__(
        self,
        spec: ViTSpec,
        input_size: int,
        num_frames: int,
        patch_size: int,
        tubelet_size: int,
        in_chans: int = 3,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.encoder = VideoEncoder(
            spec,
            input_size,
            num_frames,
            patch_size,
            tubelet_size,
            in_chans,
            drop_path=drop_path,
            final_norm=True,
        )
        self.num_patches = self.encoder.num_patches
        self.grid = self.encoder.grid
        self.patch_dim = tubelet_size * patch_size * patch_size * in_chans
        self.encoder_to_decoder = nn.Linear(spec.embed_dim, spec.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.decoder_dim))
        self.register_buffer(
            "pos_embed", sincos_position_table(self.num_patches, spec.decoder_dim), persistent=False
        )
        self.decoder = PretrainDecoder(
            spec.decoder_dim,
            spec.decoder_depth,
            spec.decoder_heads,
            self.patch_dim,
            spec.mlp_ratio,
            drop_path,
        )
        self.apply(init_xavier)
        trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n_masked = check_equal_mask_counts(mask, self.num_patches)
        visible = self.encoder_to_decoder(self.encoder.forward_features(x, mask))
        b, _, d = visible.shape
        pos = self.pos_embed.to(visible.dtype).expand(b, -1, -1)
        # Visible tokens first, mask tokens last, each with its own position (order inside
        # each group is ascending token index, which is what the targets use).
        tokens = torch.cat(
            [
                visible + pos[~mask].reshape(b, -1, d),
                self.mask_token.to(visible.dtype) + pos[mask].reshape(b, -1, d),
            ],
            dim=1,
        )
        return self.decoder(tokens, n_masked)


class VideoClassifier(VideoEncoder):
    """Fine-tuning model: the encoder (``norm`` = identity) followed by a pooling head.

    The head's layers (``fc_norm``, ``head``, and ``cross_block`` for MCA) are registered
    directly on this module, not under a sub-module, so that parameter names are VideoMAE's
    (``fc_norm.weight``, ``head.weight``) and its fine-tuned checkpoints load unchanged.

    ``forward(x, inbox=None)``: ``inbox`` bool ``(B, N)`` marks in-box tokens (needed by the
    MCA head, ignored by mean pooling). Returns logits ``(B, classes)``, or a dict of logits
    (e.g. ``{"verb": ..., "noun": ...}``) for a multi-output head.
    """

    def __init__(
        self,
        spec: ViTSpec,
        input_size: int,
        num_frames: int,
        patch_size: int,
        tubelet_size: int,
        head: nn.Module,
        in_chans: int = 3,
        drop_path: float = 0.0,
    ):
        super().__init__(
            spec,
            input_size,
            num_frames,
            patch_size,
            tubelet_size,
            in_chans,
            drop_path=drop_path,
            final_norm=False,
        )
        self.apply(init_trunc_normal)  # encoder only; the head initialised itself
        if any(True for _ in head.parameters(recurse=False)):
            raise ValueError("a classifier head must keep its parameters in sub-modules")
        for name, child in head.named_children():
            self.add_module(name, child)
        self._pool_head = (head,)  # a tuple, so that nn.Module does not register it twice
        self.head_kind = type(head).__name__

    @property
    def pool_head(self) -> nn.Module:
        return self._pool_head[0]

    def forward(self, x: Tensor, inbox: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        return self.pool_head(self.forward_features(x), inbox)


def _spec_from_cfg(model_cfg: Mapping[str, Any], overrides: dict[str, Any]) -> ViTSpec:
    spec_keys = set(ViTSpec.__dataclass_fields__)
    return model_spec(
        model_cfg["size"], **{k: overrides.pop(k) for k in list(overrides) if k in spec_keys}
    )


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
    head: str = "mean",
    drop_path: float = 0.1,
    head_init_scale: float = 0.001,
    num_heads_out: Mapping[str, int] | None = None,
    fc_dropout: float = 0.0,
    mca_num_heads: int | None = None,
    **overrides: Any,
) -> VideoClassifier:
    """Fine-tuning classifier from the ``model`` config section.

    ``head``: ``"mean"`` (VideoMAE mean pooling) or ``"mca"`` (MOFO motion cross-attention).
    ``num_heads_out``: several linear outputs on the same pooled feature, e.g.
    ``{"verb": 97, "noun": 300}`` for EPIC-KITCHENS (``num_classes`` is then ignored).
    ``mca_num_heads``: attention heads of the MCA block (default 3 as in MOFO, or the encoder's
    head count when the width is not divisible by 3). ``overrides``: :class:`ViTSpec` fields.
    """
    from mofo.models.heads import MeanPoolHead, MotionCrossAttentionHead

    overrides = dict(overrides)
    spec = _spec_from_cfg(model_cfg, overrides)
    outputs: int | dict[str, int]
    if num_heads_out:
        outputs = dict(num_heads_out)
    elif num_classes is not None and num_classes > 0:
        outputs = int(num_classes)
    else:
        raise ValueError(f"build_classifier: num_classes must be > 0, got {num_classes!r}")
    if head == "mean":
        pool: nn.Module = MeanPoolHead(spec.embed_dim, outputs, fc_dropout, head_init_scale)
    elif head == "mca":
        heads = mca_num_heads or (3 if spec.embed_dim % 3 == 0 else spec.num_heads)
        pool = MotionCrossAttentionHead(
            spec.embed_dim, outputs, heads, spec.mlp_ratio, drop_path, fc_dropout, head_init_scale
        )
    else:
        raise ValueError(f"unknown classifier head {head!r}; choose 'mean' or 'mca'")
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
