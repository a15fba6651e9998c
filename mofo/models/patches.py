"""Clips <-> tubelet tokens of pixels: ``patchify``, ``unpatchify``, the pixel targets.

The one place that knows how a clip is cut into the decoder's pixel tokens; the loss
(:mod:`mofo.training.losses`) and the reconstruction pictures (:mod:`mofo.viz.figures`)
both use it. Token order is the encoder's, time-major ``(t, row, col)`` over the tubelet grid
``(T / tubelet, H / patch, W / patch)`` (the order in which a ``Conv3d`` patch embedding
flattens its output); one token's vector is ``(frame, row, column, channel)`` with the
channel innermost (VideoMAE's ``b n p c -> b n (p c)``), which is what the decoder ``head``
predicts.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

# The statistics the data loader normalises frames with (mofo.inputs.transforms).
IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
PATCH_NORM_EPS = 1e-6  # VideoMAE's per-patch target normalisation: (x - mean) / (std + eps)


def denormalize(frames: Tensor) -> Tensor:
    """Undo the ImageNet normalisation of ``(B, 3, T, H, W)`` frames -> values in [0, 1]."""
    mean = frames.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = frames.new_tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return frames * std + mean


def patchify(videos: Tensor, patch_size: int, tubelet_size: int) -> Tensor:
    """Cut ``(B, C, T, H, W)`` clips into tokens ``(B, N, tubelet * patch * patch * C)``.

    Token order is time-major ``(t, h, w)`` (the tubelet embedding's flatten order); inside a token
    the pixels run ``(tubelet, row, column)`` with the channel last, so ``.reshape(B, N, -1, C)``
    gives the pixels of each token with the channel apart.
    """
    _, _, t, h, w = videos.shape
    if t % tubelet_size or h % patch_size or w % patch_size:
        raise ValueError(
            f"clip of shape {tuple(videos.shape)} does not divide into tubelets of "
            f"{tubelet_size}x{patch_size}x{patch_size}"
        )
    return rearrange(videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)",
                     p0=tubelet_size, p1=patch_size, p2=patch_size)


def unpatchify(
    tokens: Tensor, patch_size: int, tubelet_size: int, grid: tuple[int, int, int]
) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, q*p*p*C)`` on ``grid`` -> ``(B, C, T, H, W)``."""
    gt, gh, gw = grid
    return rearrange(tokens, "b (t h w) (p0 p1 p2 c) -> b c (t p0) (h p1) (w p2)",
                     t=gt, h=gh, w=gw, p0=tubelet_size, p1=patch_size, p2=patch_size)


def pixel_targets(
    videos: Tensor,
    patch_size: int,
    tubelet_size: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    normalize: bool = True,
    eps: float = PATCH_NORM_EPS,
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
