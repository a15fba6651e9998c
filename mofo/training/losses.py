"""Training losses: the VideoMAE reconstruction target and loss, and the fine-tuning losses.

Token order everywhere in mofo is time-major ``(t, row, col)`` over the tubelet grid
``(T / tubelet, S / patch, S / patch)``, the order in which a ``Conv3d`` patch embedding
flattens its output; one token's pixel vector is ``(dt, dy, dx, channel)`` with the channel
innermost (VideoMAE's ``b n p c -> b n (p c)``), so ``unpatchify`` can undo it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mofo.models.vit import patchify as model_patchify
from mofo.models.vit import pixel_targets

# torchvision / timm ImageNet statistics; the data loader normalises frames with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_NORM_EPS = 1e-6


def denormalize(frames: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of ``(B, 3, T, H, W)`` frames -> values in [0, 1]."""
    mean = frames.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = frames.new_tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return frames * std + mean


def patchify(frames: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, N, tubelet*patch*patch, C)`` (the model's token order)."""
    b, c, t, h, w = frames.shape
    if t % tubelet_size or h % patch_size or w % patch_size:
        raise ValueError(f"clip of shape {tuple(frames.shape)} does not divide into tubelets of "
                         f"{tubelet_size}x{patch_size}x{patch_size}")
    tokens = model_patchify(frames, patch_size, tubelet_size)
    return tokens.reshape(b, tokens.shape[1], -1, c)


def unpatchify(
    tokens: torch.Tensor, patch_size: int, tubelet_size: int, grid: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of ``patchify`` after flattening: ``(B, N, q*p*p*C)`` -> ``(B, C, T, H, W)``."""
    b = tokens.shape[0]
    gt, gh, gw = grid
    p, q = patch_size, tubelet_size
    c = tokens.shape[-1] // (q * p * p)
    x = tokens.reshape(b, gt, gh, gw, q, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, gt * q, gh * p, gw * p)


def patch_normalized_target(
    frames: torch.Tensor, patch_size: int, tubelet_size: int, normalize: bool = True
) -> torch.Tensor:
    """VideoMAE's regression target for every token: ``(B, N, q*p*p*3)``.

    The ImageNet normalisation is undone, the clip is cut into tubelet patches and, when
    ``normalize``, each patch has its own per-channel mean subtracted and is divided by its
    per-channel (unbiased) standard deviation plus 1e-6 (``mofo.models.vit.pixel_targets``).
    """
    with torch.no_grad():
        return pixel_targets(frames, patch_size, tubelet_size, IMAGENET_MEAN, IMAGENET_STD,
                             normalize=normalize, eps=PATCH_NORM_EPS)


def masked_reconstruction_loss(
    pred: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, patch_size: int,
    tubelet_size: int, normalize: bool = True,
) -> torch.Tensor:
    """MSE between the decoder's predictions for the masked tokens and their targets.

    ``pred`` is ``(B, N_masked, D)`` in token order of the masked positions; ``mask`` is the
    ``(B, N)`` boolean mask (True = masked) with the same count in every row.
    """
    target = patch_normalized_target(frames, patch_size, tubelet_size, normalize)
    b, n, d = target.shape
    if mask.shape != (b, n):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {b} clips x {n} tokens")
    labels = target[mask].reshape(b, -1, d)
    if pred.shape != labels.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != target shape {tuple(labels.shape)} "
            "(masked tokens per clip x tubelet*patch*patch*3)"
        )
    return F.mse_loss(pred.float(), labels)


def classification_loss(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy for mixed/smoothed (float) targets; for integer labels
    cross-entropy with ``label_smoothing`` (timm's LabelSmoothingCrossEntropy when > 0)."""
    logits = logits.float()
    if target.is_floating_point():
        return SoftTargetCrossEntropy()(logits, target)
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)(logits, target)
    return F.cross_entropy(logits, target)
