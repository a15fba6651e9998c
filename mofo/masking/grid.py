"""Token grid of the model input and the tokens a motion box covers.

Token order is VideoMAE's flatten order (t, h, w): token ``n = (ti * h + hi) * w + wi``, where
``ti`` is the tubelet (frames ``ti*tubelet .. ti*tubelet + tubelet - 1``) and ``(hi, wi)`` the
spatial cell (pixels ``hi*patch .. (hi+1)*patch - 1`` down, ``wi*patch ..`` across).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

Grid = tuple[int, int, int]


def token_grid(model_cfg: Mapping[str, Any]) -> Grid:
    """``(t, h, w)`` tokens of a clip for the ``model`` config section (square crops)."""
    size, patch = int(model_cfg["input_size"]), int(model_cfg["patch_size"])
    frames, tubelet = int(model_cfg["num_frames"]), int(model_cfg["tubelet_size"])
    if size % patch:
        raise ValueError(f"model.input_size {size} is not a multiple of model.patch_size {patch}")
    if frames % tubelet:
        raise ValueError(
            f"model.num_frames {frames} is not a multiple of model.tubelet_size {tubelet}"
        )
    return frames // tubelet, size // patch, size // patch


def _cells_overlapping(lo: np.ndarray, hi: np.ndarray, n_cells: int, patch: int) -> np.ndarray:
    """bool ``(T, n_cells)``: cell ``j`` (pixels ``[j*patch, (j+1)*patch)``) meets ``[lo, hi)``.

    An empty interval (``hi <= lo``) meets no cell.
    """
    starts = np.arange(n_cells) * patch
    meets = (lo[:, None] < starts[None, :] + patch) & (hi[:, None] > starts[None, :])
    return meets & (hi > lo)[:, None]


def inbox_tokens(
    boxes: np.ndarray, num_frames: int, input_size: int, patch_size: int, tubelet_size: int
) -> np.ndarray:
    """bool ``(t*h*w,)``: tokens whose spatial cell overlaps the box in ANY of their frames.

    ``boxes``: ``(num_frames, 4)`` boxes ``x1, y1, x2, y2`` (x2, y2 exclusive) in the pixel
    coordinates of the model's crop, one per sampled frame; coordinates may be fractional and
    may reach outside the crop (only the overlap counts). A frame whose box is empty
    (``x2 <= x1`` or ``y2 <= y1``) or not finite covers no token.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (num_frames, 4):
        raise ValueError(f"expected one box per frame, shape ({num_frames}, 4), got {boxes.shape}")
    t, h, w = token_grid(
        {
            "input_size": input_size,
            "patch_size": patch_size,
            "num_frames": num_frames,
            "tubelet_size": tubelet_size,
        }
    )
    valid = np.isfinite(boxes).all(1)
    safe = np.where(valid[:, None], boxes, 0.0)
    cols = _cells_overlapping(safe[:, 0], safe[:, 2], w, patch_size)  # (T, w)
    rows = _cells_overlapping(safe[:, 1], safe[:, 3], h, patch_size)  # (T, h)
    per_frame = rows[:, :, None] & cols[:, None, :] & valid[:, None, None]  # (T, h, w)
    per_token = per_frame.reshape(t, tubelet_size, h, w).any(1)  # any frame of the tubelet
    return per_token.reshape(-1)


def inbox_tubes(inbox: np.ndarray, grid: Grid) -> np.ndarray:
    """bool ``(h*w,)``: spatial cells (tubes) with an in-box token at any time."""
    t, h, w = grid
    inbox = np.asarray(inbox, dtype=bool)
    if inbox.shape != (t * h * w,):
        raise ValueError(
            f"expected in-box flags of shape ({t * h * w},) for grid {grid}, got {inbox.shape}"
        )
    return inbox.reshape(t, h * w).any(0)
