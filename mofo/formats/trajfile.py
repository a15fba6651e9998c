"""Point trajectories (MME's motion target): the file format, its reader, and the crop that
turns a clip's stored trajectories into per-token targets.

The trajectories stage (:mod:`mofo.motion.trajectories`) writes them; this module sits below
it, in the data layer, so that the dataset can read them (as :mod:`mofo.formats.boxfile` does for
the boxes).

File ``trajectories/shard-XXXX.npz`` (one per shard; deflated), one int8 array per clip id,
``(T, L, gh, gw, 3)``: for each start frame ``s`` of the clip's ``T`` stored frames, the ``L``
steps of the points seeded at the cell centres ``((j + 0.5) * spacing, (i + 0.5) * spacing)``
of the flow grid (continuous coordinates: pixel ``x`` covers ``[x, x + 1)``), followed along
flow ``s, s+1, ...``. Channels:

* 0, 1: the step's displacement ``(dx, dy)``, quantised ``q = round(d * 127 / bound)``, so one
  unit is ``bound / 127`` px of the flow grid (0.157 px at the default bound of 20) and
  ``|d| <= bound`` fits int8 exactly;
* 2: the validity flag (1 / 0). A point that leaves the flow grid is invalid from the step
  that takes it out onwards; steps past the clip's last flow are invalid too. Invalid steps
  store displacement 0.

Per shard: ``__bound__`` (float, px), ``__spacing__`` (int, px), ``__clips__`` (the clip ids)
and ``__grids__`` (int32 ``(n_clips, 2)``: each clip's flow grid ``(h, w)``). One member per
clip keeps a loader's read to one zip entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUANT_LEVELS = 127  # int8 steps per flow bound: d = q * bound / 127


class TrajectoryFileError(RuntimeError):
    """A trajectory file or one of its clips is missing or malformed; the message names it."""


def quantize(disp: np.ndarray, bound: float) -> np.ndarray:
    """Displacements in px (clipped to ``+-bound``) -> int8 ``round(d * 127 / bound)``."""
    scaled = np.clip(np.asarray(disp, dtype=np.float32), -bound, bound) * (QUANT_LEVELS / bound)
    return np.rint(scaled).astype(np.int8)


def dequantize(q: np.ndarray, bound: float) -> np.ndarray:
    """int8 -> float32 px: ``q * bound / 127``."""
    return np.asarray(q, dtype=np.float32) * np.float32(bound / QUANT_LEVELS)


@dataclass(frozen=True)
class ClipTrajectories:
    """One clip's trajectories, de-quantised: ``disp`` float32 ``(T, L, gh, gw, 2)`` px of
    the flow grid, ``valid`` bool ``(T, L, gh, gw)``, ``grid_hw`` the flow grid's ``(h, w)``
    and ``spacing`` (px of the flow grid between points)."""

    disp: np.ndarray
    valid: np.ndarray
    grid_hw: tuple[int, int]
    spacing: int


def encode_clip(disp: np.ndarray, valid: np.ndarray, bound: float) -> np.ndarray:
    """float ``(T, L, gh, gw, 2)`` px + bool ``(T, L, gh, gw)`` -> the file's int8 array."""
    out = np.empty((*valid.shape, 3), dtype=np.int8)
    out[..., :2] = quantize(np.where(valid[..., None], disp, 0.0), bound)
    out[..., 2] = valid
    return out


class TrajectoryFile:
    """Reader of one ``trajectories/shard-XXXX.npz`` (opened lazily, clips read on demand)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise TrajectoryFileError(f"{self.path}: no trajectory file (run the trajectories rule)")
        self._npz = np.load(self.path)
        try:
            self.bound = float(self._npz["__bound__"])
            self.spacing = int(self._npz["__spacing__"])
            grids = self._npz["__grids__"]
            self.grids = {str(c): (int(h), int(w)) for c, (h, w) in zip(self._npz["__clips__"], grids)}
        except KeyError as err:
            raise TrajectoryFileError(f"{self.path}: not a trajectory file (no {err})") from None

    def clip(self, clip_id: str) -> ClipTrajectories:
        """The de-quantised trajectories of ``clip_id``; TrajectoryFileError if absent."""
        if clip_id not in self.grids:
            raise TrajectoryFileError(f"{self.path}: no trajectories for clip {clip_id!r}")
        q = self._npz[clip_id]
        if q.ndim != 5 or q.shape[-1] != 3 or q.dtype != np.int8:
            raise TrajectoryFileError(f"{self.path}: clip {clip_id!r} has {q.dtype} {q.shape}, "
                                      "not int8 (T, L, gh, gw, 3)")
        return ClipTrajectories(dequantize(q[..., :2], self.bound), q[..., 2] != 0,
                                self.grids[clip_id], self.spacing)


def token_trajectories(
    traj: ClipTrajectories, starts: np.ndarray, frame_hw: tuple[int, int],
    crop: tuple[int, int, int, int], input_size: int, patch_size: int, cell: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token trajectory targets of a clip cropped and resized like its frames.

    ``starts``: the stored-frame index where each tubelet's trajectories start (its first
    sampled frame), ``(T_tok,)``. ``frame_hw``: the stored frames' ``(H, W)``; ``crop``:
    ``(x0, y0, crop_w, crop_h)`` in stored-frame pixels, resized to ``input_size`` square.

    The model input is cut into ``cell``-px cells (``patch_size / cell`` per patch side);
    each cell centre is mapped back through the resize and the crop onto the flow grid and
    takes the nearest stored point's trajectory. Displacements are rescaled from flow-grid
    pixels to model-input pixels (flow grid -> stored frame -> crop -> resize, per axis).

    Returns ``disp`` float32 ``(N, k*k, L, 2)`` (model-input px, ``(dx, dy)``) and ``valid``
    bool ``(N, k*k, L)``, token order ``(t, h, w)``, the ``k x k`` cells of a patch row-major.
    """
    if patch_size % cell:
        raise ValueError(f"pretrain.mme.cell {cell} must divide model.patch_size {patch_size}")
    height, width = frame_hw
    gh_flow, gw_flow = traj.grid_hw
    x0, y0, crop_w, crop_h = crop
    centres = (np.arange(input_size // cell) + 0.5) * cell  # model-input px
    x_flow = (x0 + centres * crop_w / input_size) * gw_flow / width
    y_flow = (y0 + centres * crop_h / input_size) * gh_flow / height
    n_rows, n_cols = traj.disp.shape[2:4]
    cols = np.clip(np.floor(x_flow / traj.spacing).astype(np.int64), 0, n_cols - 1)
    rows = np.clip(np.floor(y_flow / traj.spacing).astype(np.int64), 0, n_rows - 1)
    starts = np.minimum(np.asarray(starts, dtype=np.int64), traj.disp.shape[0] - 1)
    disp = traj.disp[starts][:, :, rows][:, :, :, cols]  # (Tt, L, G, G, 2)
    valid = traj.valid[starts][:, :, rows][:, :, :, cols]  # (Tt, L, G, G)
    scale = np.array([width / gw_flow * input_size / crop_w,
                      height / gh_flow * input_size / crop_h], dtype=np.float32)
    disp = disp * scale
    k, side = patch_size // cell, input_size // patch_size
    t_tok, steps = disp.shape[:2]
    disp = disp.reshape(t_tok, steps, side, k, side, k, 2).transpose(0, 2, 4, 3, 5, 1, 6)
    valid = valid.reshape(t_tok, steps, side, k, side, k).transpose(0, 2, 4, 3, 5, 1)
    n = t_tok * side * side
    return (np.ascontiguousarray(disp.reshape(n, k * k, steps, 2), dtype=np.float32),
            np.ascontiguousarray(valid.reshape(n, k * k, steps)))
