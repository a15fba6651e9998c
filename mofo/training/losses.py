"""Training losses: the VideoMAE reconstruction target and loss, and the fine-tuning losses.

How clips are cut into pixel tokens (``patchify``, ``unpatchify``, ``denormalize``, the
ImageNet statistics) lives in :mod:`mofo.models.patches`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mofo.models.hog import hog_token_targets
from mofo.models.patches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_NORM_EPS,
    denormalize,
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


def _masked_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask]`` as ``(B, N_masked, ...)`` (every clip masks the same count)."""
    return values[mask].reshape(mask.shape[0], -1, *values.shape[2:])


def mme_loss(
    pred: dict[str, torch.Tensor], frames: torch.Tensor, mask: torch.Tensor,
    trajectories: torch.Tensor, trajectory_valid: torch.Tensor, patch_size: int,
    tubelet_size: int, cell: int, orientations: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MME's loss: the mean of the trajectory MSE and the HOG MSE over the masked tokens.

    ``pred``: :class:`mofo.models.vit.MMEDecoder`'s ``{"trajectory": (B, N_masked, P*L*2),
    "hog": (B, N_masked, P*C*bins)}`` in ascending masked-token order. ``trajectories``
    float ``(B, N, P, L, 2)`` (model-input px) and ``trajectory_valid`` bool ``(B, N, P, L)``
    come from the dataset; the target is the displacement in patch units, clipped to the
    tanh's ``[-1, 1]``, and only valid point steps count (weight 0 elsewhere; 0 when a batch
    has none). The HOG target is computed here from ``frames`` (ImageNet-normalised
    ``(B, 3, T, S, S)``), on their device (:func:`mofo.models.hog.hog_token_targets`).
    Returns the loss and ``{"loss_trajectory", "loss_hog"}`` (detached tensors).
    """
    b, n = mask.shape
    if trajectories.shape[:2] != (b, n) or trajectory_valid.shape != trajectories.shape[:-1]:
        raise ValueError(f"trajectories {tuple(trajectories.shape)} / valid "
                         f"{tuple(trajectory_valid.shape)} do not match {b} clips x {n} tokens")
    with torch.no_grad():
        target = (_masked_rows(trajectories.float(), mask) / patch_size).clamp(-1.0, 1.0)
        weight = _masked_rows(trajectory_valid, mask).float()[..., None].expand_as(target)
        hog = _masked_rows(hog_token_targets(
            denormalize(frames.float()), patch_size, tubelet_size, cell, orientations), mask)
    traj_pred = pred["trajectory"].float().reshape(target.shape)
    traj = ((traj_pred - target) ** 2 * weight).sum() / weight.sum().clamp(min=1.0)
    hog_loss = F.mse_loss(pred["hog"].float(), hog)
    return 0.5 * (traj + hog_loss), {"loss_trajectory": traj.detach(),
                                       "loss_hog": hog_loss.detach()}


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
