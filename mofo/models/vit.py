"""The VideoMAE vision transformer: model sizes, encoder, pretraining autoencoder, classifier.

Built from the blocks of :mod:`mofo.models.layers`; the classifier takes a ready pooling head
(:mod:`mofo.models.heads`) and :mod:`mofo.models.build` makes the models from the config.
Parameter names follow the official VideoMAE / MOFO
checkpoints (``patch_embed.proj.weight``, ``blocks.0.attn.q_bias``, ``fc_norm.weight``,
``encoder.blocks...``, ``encoder_to_decoder.weight``, ``mask_token``, ``decoder.head.weight``)
so that those files load without renaming (see :mod:`mofo.models.checkpoint`).

Token order is VideoMAE's: the Conv3d output flattened over (t, h, w), i.e. token
``n = (ti * h + hi) * w + wi``. Masks, in-box flags and pixel targets all use this order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mofo.masking.everest import motion_drop_mask, slice_distances
from mofo.masking.grid import token_grid
from mofo.models.layers import (
    LAYER_NORM_EPS,
    Block,
    PatchEmbed3D,
    PositionTableModule,
    drop_path_rates,
    init_trunc_normal,
    init_xavier,
    sincos_position_table,
)


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


class VideoEncoder(PositionTableModule):
    """ViT encoder over tubelet tokens with a fixed sine-cosine position table (or a loaded one).

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
        # Fixed, not trained, not saved (VideoMAE keeps it out of its checkpoints as well)
        # unless a learned table is loaded into it (PositionTableModule).
        self.register_buffer(
            "pos_embed", sincos_position_table(self.num_patches, spec.embed_dim), persistent=False
        )
        self.blocks = nn.ModuleList(
            Block(spec.embed_dim, spec.num_heads, spec.mlp_ratio, True, drop, attn_drop, rate)
            for rate in drop_path_rates(drop_path, spec.depth)
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

    def embed(self, x: Tensor) -> Tensor:
        """The tubelet embeddings ``(B, N, D)`` of clips ``(B, C, T, H, W)``, token order
        (t, h, w), before the position table (what model-side token selection ranks)."""
        self.check_input(x)
        return self.patch_embed(x)

    def encode(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Position table, then the blocks and ``norm`` on the tokens where ``mask`` (bool
        ``(B, N)``, True = hidden, same count per clip) is False: ``(B, N_visible, D)``."""
        x = tokens + self.pos_embed.to(tokens.dtype)
        if mask is not None:
            x = x[~mask].reshape(x.shape[0], -1, x.shape[-1])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.encode(self.embed(x), mask)

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
            for rate in drop_path_rates(drop_path, depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, out_dim)

    def features(self, x: Tensor, num_predicted: int) -> Tensor:
        """The normalised decoder features of the last ``num_predicted`` tokens."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, x.shape[1] - num_predicted :])

    def forward(self, x: Tensor, num_predicted: int) -> Tensor:
        return self.head(self.features(x, num_predicted))


class MMEDecoder(PretrainDecoder):
    """MME's decoder: the same blocks and ``norm``, and two heads in place of the pixel head:
    ``traj_head`` (tanh: per-step point displacements, in patch units) and ``hog_head``
    (sigmoid: per-cell orientation histograms). ``forward`` returns
    ``{"trajectory": (B, n, traj_dim), "hog": (B, n, hog_dim)}``."""

    def __init__(self, dim: int, depth: int, num_heads: int, traj_dim: int, hog_dim: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__(dim, depth, num_heads, traj_dim, mlp_ratio, drop_path)
        del self.head
        self.traj_head = nn.Linear(dim, traj_dim)
        self.hog_head = nn.Linear(dim, hog_dim)

    def forward(self, x: Tensor, num_predicted: int) -> dict[str, Tensor]:
        x = self.features(x, num_predicted)
        return {"trajectory": torch.tanh(self.traj_head(x)), "hog": torch.sigmoid(self.hog_head(x))}


class PretrainVideoMAE(PositionTableModule):
    """Masked video autoencoder (VideoMAE): encoder on visible tokens, decoder predicts pixels.

    ``forward(x, mask, target=None)`` with clips ``(B, 3, T, H, W)``, ``mask`` bool ``(B, N)``
    (True = hidden from the encoder, same count in every clip) and ``target`` bool ``(B, N)``
    (True = reconstructed; a subset of ``mask``, same count in every clip; None = ``mask``)
    returns ``(B, N_target, tubelet*patch*patch*3)``: the predictions for the target tokens in
    ascending token order, i.e. aligned with ``patchify(x, ...)[target].reshape(B, N_target,
    -1)``. Hidden tokens outside ``target`` are DROPPED: the decoder gets no mask token for
    them (EVEREST), so it runs on ``N_visible + N_target`` tokens.

    ``mme_dims=(traj_dim, hog_dim)`` makes the decoder MME's (:class:`MMEDecoder`): ``forward``
    then returns its dict of trajectory and HOG predictions for the target tokens, same order.
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
        mme_dims: tuple[int, int] | None = None,
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
        if mme_dims is None:
            self.decoder = PretrainDecoder(
                spec.decoder_dim,
                spec.decoder_depth,
                spec.decoder_heads,
                self.patch_dim,
                spec.mlp_ratio,
                drop_path,
            )
        else:
            self.decoder = MMEDecoder(spec.decoder_dim, spec.decoder_depth, spec.decoder_heads,
                                      *mme_dims, spec.mlp_ratio, drop_path)
        self.apply(init_xavier)
        trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, x: Tensor, mask: Tensor,
                target: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        check_equal_mask_counts(mask, self.num_patches)
        if target is None:
            target = mask
        n_target = check_equal_mask_counts(target, self.num_patches)
        if bool((target & ~mask).any()):
            raise ValueError("reconstruction targets must be hidden tokens (target within mask)")
        visible = self.encoder_to_decoder(self.encoder.forward_features(x, mask))
        b, _, d = visible.shape
        pos = self.pos_embed.to(visible.dtype).expand(b, -1, -1)
        # Visible tokens first, mask tokens last, each with its own position (order inside
        # each group is ascending token index, which is what the targets use).
        tokens = torch.cat(
            [
                visible + pos[~mask].reshape(b, -1, d),
                self.mask_token.to(visible.dtype) + pos[target].reshape(b, -1, d),
            ],
            dim=1,
        )
        return self.decoder(tokens, n_target)


class VideoClassifier(VideoEncoder):
    """Fine-tuning model: the encoder (``norm`` = identity) followed by a pooling head.

    The head's layers (``fc_norm``, ``head``, and ``cross_block`` for MCA) are registered
    directly on this module, not under a sub-module, so that parameter names are VideoMAE's
    (``fc_norm.weight``, ``head.weight``) and its fine-tuned checkpoints load unchanged.

    ``forward(x, inbox=None)``: ``inbox`` bool ``(B, N)`` marks in-box tokens (needed by the
    MCA head, ignored by mean pooling). Returns logits ``(B, classes)``, or a dict of logits
    (e.g. ``{"verb": ..., "noun": ...}``) for a multi-output head.

    A head with a ``drop_ratio`` > 0 (the mean head's EVEREST option) gets only the
    ``N - round(drop_ratio * N)`` most-moving tokens: the others (lowest
    :func:`mofo.masking.everest.slice_distances` of the patch embeddings) are dropped
    before the encoder, in training and evaluation alike.
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
        drop_ratio = float(getattr(self.pool_head, "drop_ratio", 0.0))
        if drop_ratio <= 0:
            return self.pool_head(self.forward_features(x), inbox)
        tokens = self.embed(x)
        dropped = motion_drop_mask(slice_distances(tokens, self.grid), drop_ratio)
        return self.pool_head(self.encode(tokens, dropped), None)
