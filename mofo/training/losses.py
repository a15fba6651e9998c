"""Training losses: the VideoMAE reconstruction target and loss, and the fine-tuning losses.

How clips are cut into pixel tokens (``patchify``, ``unpatchify``, ``denormalize``, the
ImageNet statistics) lives in :mod:`mofo.models.patches`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mofo.models.patches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_NORM_EPS,
    pixel_targets,
)


def patch_normalized_target(
    frames: torch.Tensor, patch_size: int, tubelet_size: int, normalize: bool = True
) -> torch.Tensor:
    """VideoMAE's regression target for every token: ``(B, N, q*p*p*3)``.

    The ImageNet normalisation is undone, the clip is cut into tubelet patches and, when
    ``normalize``, each patch has its own per-channel mean subtracted and is divided by its
    per-channel (unbiased) standard deviation plus 1e-6 (``mofo.models.patches.pixel_targets``).
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
