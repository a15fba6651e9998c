"""Pictures written by training and evaluation (matplotlib, Agg backend, PNG).

- ``reconstruction_figure``: for one clip, rows original / masked input / reconstruction
  for a few frames, with the motion box drawn;
- ``confusion_figure``: the row-normalised confusion matrix.

Drawing only: it imports ``mofo.models.patches`` and nothing from training or evaluation, so
that pretraining can draw its reconstructions with it (docs/ARCHITECTURE.md, package map).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from mofo.models.patches import PATCH_NORM_EPS, denormalize, patchify, unpatchify


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; return the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def reconstruct_clip(
    frames: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, patch_size: int,
    tubelet_size: int, normalized_target: bool = True, dropped: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Masked input and reconstruction of one clip as ``(T, H, W, 3)`` arrays in [0, 1].

    ``frames`` (3, T, H, W) normalised, ``mask`` (N,) bool (the reconstructed tokens),
    ``pred`` (N_masked, D); ``dropped`` (N,) bool: tokens neither seen nor reconstructed
    (EVEREST), black in both pictures (masked tokens are grey in the input). With
    per-patch normalised targets the predicted patches are mapped back to pixels with the
    original patch's mean and std (VideoMAE's visualisation does the same), so the picture
    shows structure, not absolute colour, inside masked patches.
    """
    x = frames.detach().float().cpu()[None]
    _, _, t, h, w = x.shape
    grid = (t // tubelet_size, h // patch_size, w // patch_size)
    patches = patchify(denormalize(x), patch_size, tubelet_size)[0]
    patches = patches.reshape(patches.shape[0], -1, x.shape[1])  # (N, P, C)
    mask = mask.detach().cpu().bool()
    pred = pred.detach().float().cpu().reshape(int(mask.sum()), patches.shape[1], patches.shape[2])
    if normalized_target:
        orig = patches[mask]
        mean = orig.mean(dim=-2, keepdim=True)
        std = orig.var(dim=-2, unbiased=True, keepdim=True).sqrt() + PATCH_NORM_EPS
        pred = pred * std + mean
    recon = patches.clone()
    recon[mask] = pred
    masked = patches.clone()
    masked[mask] = 0.5  # grey
    if dropped is not None:
        dropped = dropped.detach().cpu().bool()
        masked[dropped] = 0.0
        recon[dropped] = 0.0
    def as_thwc(p: torch.Tensor) -> np.ndarray:
        video = unpatchify(p.flatten(1)[None], patch_size, tubelet_size, grid)[0]
        return video.clamp(0, 1).permute(1, 2, 3, 0).numpy()

    return as_thwc(masked), as_thwc(recon)


def reconstruction_figure(
    frames: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, boxes: np.ndarray | None,
    path: str | Path, patch_size: int, tubelet_size: int, normalized_target: bool = True,
    n_show: int = 4, title: str = "", dropped: torch.Tensor | None = None,
) -> Path:
    """Save original / masked / reconstructed frames of one clip with its motion box
    (``dropped``: tokens neither seen nor reconstructed, drawn black)."""
    masked, recon = reconstruct_clip(frames, mask, pred, patch_size, tubelet_size,
                                     normalized_target, dropped)
    original = denormalize(frames.detach().float().cpu()[None])[0].clamp(0, 1)
    original = original.permute(1, 2, 3, 0).numpy()
    t = original.shape[0]
    shown = np.unique(np.linspace(0, t - 1, min(n_show, t)).round().astype(int))
    rows = [("original", original), ("masked", masked), ("reconstruction", recon)]
    fig, axes = plt.subplots(3, len(shown), figsize=(2.0 * len(shown), 6.3), squeeze=False)
    for r, (name, video) in enumerate(rows):
        for c, f in enumerate(shown):
            ax = axes[r][c]
            ax.imshow(video[f])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=8)
            if boxes is not None and np.all(np.isfinite(boxes[f])):
                x1, y1, x2, y2 = (float(v) for v in boxes[f])
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                       edgecolor="lime", linewidth=1.2))
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def confusion_figure(
    confusion: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None,
    title: str = "", max_labelled: int = 40,
) -> Path:
    """Save the row-normalised confusion matrix (true = rows, predicted = columns).

    Class names are written on the axes when there are at most ``max_labelled`` classes.
    """
    confusion = np.asarray(confusion, dtype=float)
    rows = confusion.sum(1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    n = confusion.shape[0]
    side = min(4 + 0.3 * n, 16)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    image = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= max_labelled:
        names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if confusion[i, j]:
                        ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                                color="w" if norm[i, j] < 0.6 else "k", fontsize=7)
    ax.set_title(title or "confusion matrix", fontsize=9)
    return save_figure(fig, path)
