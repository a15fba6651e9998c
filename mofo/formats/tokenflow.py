"""The kept coarse flow (``flow/shard-XXXX.pooled.npz``) and a clip's flow at its token grid.

The dense flow of the optical_flow stage is temporary; the flow job also keeps this small
product for the masking strategies that follow motion (``masking.strategy: mgmae``):

``flow/shard-XXXX.pooled.npz``: one float16 array ``(P, gh, gw, 2)`` per clip id, ``P`` = the
clip's stored frames - 1. Entry ``[i, r, c]`` is the mean flow of frame ``i -> i+1`` over cell
``(r, c)`` of a ``gh x gw`` grid laid over the whole frame (cell ``c`` spans the fractions
``[c/gw, (c+1)/gw)`` of the width), as ``(u / frame width, v / frame height)``: fractions of
the frame. So the file depends neither on the flow grid's scale nor on the model's input
size; the loader crops and resizes it with the clip's own transform. ``gh x gw``:
``optical_flow.pooled_cells`` cells along the shorter side, square cells (:func:`pooled_grid`).

This module is below the motion stage that writes the file (like ``boxfile``), so that the
dataset can read it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mofo.masking.mgmae import bilinear_sample
from mofo.paths import pattern


def pooled_flow_path(results_dir: str | Path, shard_name: str) -> Path:
    """``<results_dir>/flow/<shard_name>.pooled.npz`` (``mofo.paths.LAYOUT["pooled_flow"]``)."""
    return Path(pattern("pooled_flow", results_dir, shard=shard_name))


def pooled_grid(height: int, width: int, cells: int) -> tuple[int, int]:
    """``(gh, gw)``: ``cells`` along the shorter side (at most its pixels), the longer side in
    proportion (rounded, at least 1)."""
    if cells < 1:
        raise ValueError(f"optical_flow.pooled_cells must be >= 1, got {cells}")
    short = min(height, width)
    n = min(cells, short)
    return max(1, round(height * n / short)), max(1, round(width * n / short))


def pool_flow(flow: np.ndarray, cells: int) -> np.ndarray:
    """Dense flow float ``(P, h, w, 2)`` in pixels of its ``h x w`` grid -> float16
    ``(P, gh, gw, 2)``: area means over the :func:`pooled_grid` cells, in frame fractions."""
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (P, h, w, 2), got {flow.shape}")
    n_pairs, h, w, _ = flow.shape
    gh, gw = pooled_grid(h, w, cells)
    out = np.empty((n_pairs, gh, gw, 2), dtype=np.float32)
    for i in range(n_pairs):
        out[i] = cv2.resize(flow[i], (gw, gh), interpolation=cv2.INTER_AREA)
    out[..., 0] /= w
    out[..., 1] /= h
    return out.astype(np.float16)


def clip_token_flow(
    pooled: np.ndarray,
    indices: np.ndarray,
    crop: tuple[float, float, float, float],
    frame_size: tuple[int, int],
    input_size: int,
    patch_size: int,
) -> np.ndarray:
    """float32 ``(F-1, s, s, 2)``, ``s = input_size // patch_size``: the flow between
    consecutive sampled frames at the token cells of the model's crop, ``(dx, dy)`` in token
    cells (the contract of :mod:`mofo.masking.mgmae`).

    ``pooled``: the clip's ``(P, gh, gw, 2)`` pooled flow; ``indices``: the ``F`` sampled
    stored frames (non-decreasing; a repeated frame moves nothing); ``crop``: ``(x0, y0,
    crop_w, crop_h)`` in pixels of the ``frame_size = (width, height)`` stored frames,
    resized to ``input_size`` square. Between sampled frames ``a < b`` each token cell's
    centre is followed through the stored pairs ``a .. b-1`` (bilinear reads of the pooled
    grid, edge values outside it) and its total displacement is converted to cells.
    """
    pooled = np.asarray(pooled, dtype=np.float32)
    indices = np.asarray(indices, dtype=np.int64)
    if np.any(np.diff(indices) < 0):
        raise ValueError(f"sampled frames must be non-decreasing for the flow, got {indices.tolist()}")
    if indices.size and indices.max() > pooled.shape[0]:
        raise ValueError(f"frame {int(indices.max())} needs flow pairs the clip's {pooled.shape[0]} do not have")
    x0, y0, crop_w, crop_h = (float(v) for v in crop)
    width, height = frame_size
    n_pairs, gh, gw = pooled.shape[:3]
    s = input_size // patch_size
    centres = (np.arange(s) + 0.5) * patch_size / input_size  # fractions of the crop
    fy, fx = np.meshgrid((y0 + centres * crop_h) / height, (x0 + centres * crop_w) / width, indexing="ij")
    starts, steps = indices[:-1], np.diff(indices)  # per sampled pair: first stored pair, count
    py = np.broadcast_to(fy, (starts.size, s, s)).copy()
    px = np.broadcast_to(fx, (starts.size, s, s)).copy()
    flat = pooled.reshape(n_pairs * gh, gw, 2) if n_pairs else pooled.reshape(0, gw, 2)
    for k in range(int(steps.max()) if steps.size else 0):  # all sampled pairs at once
        moving = (k < steps)[:, None, None]
        pair = np.minimum(starts + k, n_pairs - 1)[:, None, None]
        # rows of pair p are p*gh .. p*gh+gh-1 of the stacked grid: clamp within the pair
        gy = np.clip(py * gh - 0.5, 0.0, gh - 1.0) + pair * gh
        step, _ = bilinear_sample(flat, gy, px * gw - 0.5)
        px = px + np.where(moving, step[..., 0], 0.0)
        py = py + np.where(moving, step[..., 1], 0.0)
    out = np.empty((starts.size, s, s, 2), dtype=np.float32)
    out[..., 0] = (px - fx) * width * input_size / (crop_w * patch_size)
    out[..., 1] = (py - fy) * height * input_size / (crop_h * patch_size)
    return out
