"""Histograms of oriented gradients per cell, in torch (MME's shape target), on any device.

The cell histograms are Dalal and Triggs' without block normalisation, computed the way
scikit-image's ``hog`` computes them before its block step (tests/test_mme.py checks the
two agree): gradients by central differences ``[-1, 0, 1]`` (zero on the image's outer rows
and columns), magnitude ``hypot(g_x, g_y)``, unsigned orientation ``atan2(g_y, g_x)`` in
degrees mod 180, hard-assigned to ``orientations`` equal bins; a cell's histogram is the sum
of its pixels' magnitudes per bin divided by the cell's pixel count. Pixels past the last
full cell are left out. Each colour channel has its own histogram (MME: 9 bins x 3 channels
per cell); MME's code uses Sobel gradients, which only rescale and smooth the same quantity.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def _central_gradients(images: Tensor) -> tuple[Tensor, Tensor]:
    """``(g_row, g_col)`` of ``(..., H, W)``: ``x[i+1] - x[i-1]``, zero on the outer lines."""
    g_row = torch.zeros_like(images)
    g_col = torch.zeros_like(images)
    g_row[..., 1:-1, :] = images[..., 2:, :] - images[..., :-2, :]
    g_col[..., :, 1:-1] = images[..., :, 2:] - images[..., :, :-2]
    return g_row, g_col


def hog_cells(images: Tensor, cell: int, orientations: int) -> Tensor:
    """Per-channel cell histograms: float ``(B, C, H, W)`` -> ``(B, C, H//cell, W//cell,
    orientations)`` (float32; mean gradient magnitude per bin, in units of the input)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    rows, cols = h // cell, w // cell
    if rows < 1 or cols < 1:
        raise ValueError(f"{h}x{w} images hold no {cell}-px cell")
    g_row, g_col = _central_gradients(images.float())
    g_row, g_col = g_row[..., : rows * cell, : cols * cell], g_col[..., : rows * cell, : cols * cell]
    magnitude = torch.hypot(g_row, g_col)
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0
    bins = torch.div(orientation, 180.0 / orientations, rounding_mode="floor").long()
    bins = bins.clamp_(0, orientations - 1)
    cell_index = (torch.arange(rows * cell, device=images.device) // cell)[:, None] * cols + (
        torch.arange(cols * cell, device=images.device) // cell)[None, :]
    index = (cell_index * orientations + bins).reshape(b * c, -1)
    hist = torch.zeros(b * c, rows * cols * orientations, device=images.device)
    hist.scatter_add_(1, index, magnitude.reshape(b * c, -1))
    return hist.reshape(b, c, rows, cols, orientations) / float(cell * cell)


def hog_token_targets(clip: Tensor, patch_size: int, tubelet_size: int, cell: int,
                      orientations: int) -> Tensor:
    """MME's HOG target of every token: ``(B, N, k*k*C*orientations)``, ``k = patch / cell``.

    ``clip``: ``(B, C, T, S, S)`` pixel values (ImageNet normalisation undone). A token's
    histograms are taken on the first frame of its tubelet (MME's released default), over
    the ``k x k`` cells of its patch; the values are ordered (cell row, cell column, channel,
    bin). Token order ``(t, h, w)``.
    """
    if patch_size % cell:
        raise ValueError(f"pretrain.mme.cell {cell} must divide model.patch_size {patch_size}")
    b, _, _, s, _ = clip.shape
    first = rearrange(clip[:, :, ::tubelet_size], "b c t h w -> (b t) c h w")
    hist = hog_cells(first, cell, orientations)  # (B*Tt, C, G, G, n)
    k, side = patch_size // cell, s // patch_size
    hist = hist[:, :, : side * k, : side * k]
    return rearrange(hist, "(b t) c (h k1) (w k2) n -> b (t h w) (k1 k2 c n)", b=b, k1=k, k2=k)


def hog_dim(patch_size: int, cell: int, orientations: int, channels: int = 3) -> int:
    """Length of one token's HOG target (108 for MME's 16-px patches, 8-px cells, 9 bins)."""
    return (patch_size // cell) ** 2 * channels * orientations

