"""Point trajectories from the stored dense flow (MME's motion target), once per dataset.

For every start frame of a clip, points seeded every ``trajectories.spacing`` px of the flow
grid (at cell centres) are followed through ``trajectories.steps`` consecutive flow fields.
Each step reads the flow at the point's current position (bilinear), clips it to
``+-optical_flow.bound`` and moves the point. A point that leaves the grid is invalid from
that step on. The file format (int8 displacements, valid-step counts) is
:mod:`mofo.data.trajfile`'s.

Differences from MME's released tool: the flow is read as float pixels (their loader adds the
raw uint8 codes, its de-quantisation being commented out), looked up bilinearly instead of at
the nearest pixel, and every start frame is stored (the last ones with fewer or no valid
steps) so that the loader indexes by stored frame.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mofo.data.trajfile import encode_clip
from mofo.motion.flow import save_npz_atomic


def _bilinear(flow: np.ndarray, frame: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Flow ``(F, h, w, 2)`` sampled at continuous ``(x, y)`` in field ``frame`` (all the same
    shape): bilinear between pixel centres, clamped at the border. Returns ``(..., 2)``."""
    h, w = flow.shape[1:3]
    ix = np.clip(x - 0.5, 0.0, w - 1.0)
    iy = np.clip(y - 0.5, 0.0, h - 1.0)
    x0 = np.floor(ix).astype(np.int64)
    y0 = np.floor(iy).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (ix - x0)[..., None], (iy - y0)[..., None]
    top = flow[frame, y0, x0] * (1 - fx) + flow[frame, y0, x1] * fx
    bottom = flow[frame, y1, x0] * (1 - fx) + flow[frame, y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def compute_trajectories(flow: np.ndarray, steps: int, spacing: int, bound: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Trajectories of one clip from its flow ``(T-1, h, w, 2)`` (px of the flow grid).

    Returns ``disp`` float32 ``(T, steps, gh, gw, 2)``, the per-step displacements ``(dx, dy)``
    of the points starting at every frame ``s`` (0 where invalid), and ``valid_steps`` uint8
    ``(T, gh, gw)``: the number of leading valid steps. ``gh, gw = h // spacing, w // spacing``;
    point ``(i, j)`` starts at ``((j + 0.5) * spacing, (i + 0.5) * spacing)``.
    """
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (T-1, h, w, 2), got {flow.shape}")
    flow = flow.astype(np.float32, copy=False)
    n_flows, h, w = flow.shape[:3]
    t, gh, gw = n_flows + 1, h // spacing, w // spacing
    ys, xs = np.meshgrid((np.arange(gh) + 0.5) * spacing, (np.arange(gw) + 0.5) * spacing,
                         indexing="ij")
    x = np.broadcast_to(xs, (t, gh, gw)).astype(np.float32)
    y = np.broadcast_to(ys, (t, gh, gw)).astype(np.float32)
    alive = np.ones((t, gh, gw), dtype=bool)
    disp = np.zeros((t, steps, gh, gw, 2), dtype=np.float32)
    valid_steps = np.zeros((t, gh, gw), dtype=np.uint8)
    starts = np.arange(t)[:, None, None]
    for k in range(steps):
        field = starts + k  # flow field of step k for each start frame
        alive &= field < n_flows
        if not alive.any():
            break
        d = np.clip(_bilinear(flow, np.minimum(field, n_flows - 1), x, y), -bound, bound)
        x, y = x + d[..., 0], y + d[..., 1]
        alive &= (x >= 0) & (x < w) & (y >= 0) & (y < h)
        disp[:, k] = np.where(alive[..., None], d, 0.0)
        valid_steps += alive
    return disp, valid_steps


def trajectories_shard(flow_path: str | Path, out_path: str | Path, traj_cfg: dict,
                       bound: float) -> dict:
    """Trajectories of every clip of a flow file (``flow/shard-XXXX.npz``), written to
    ``trajectories/shard-XXXX.npz`` in :mod:`mofo.data.trajfile`'s format.

    ``traj_cfg``: the ``trajectories`` config section (``steps``, ``spacing``); ``bound``:
    ``optical_flow.bound``. Returns ``{"clips": n, "valid_fraction": f}`` (the share of valid
    point steps over all start frames).
    """
    steps, spacing = int(traj_cfg["steps"]), int(traj_cfg["spacing"])
    arrays: dict[str, np.ndarray] = {}
    grids: list[tuple[int, int]] = []
    n_valid = n_total = 0
    with np.load(flow_path) as flows:
        for clip_id in tqdm(flows.files, desc=f"trajectories {Path(out_path).stem}", file=sys.stderr):
            flow = flows[clip_id]
            disp, valid_steps = compute_trajectories(flow, steps, spacing, bound)
            valid = np.arange(steps)[None, :, None, None] < valid_steps[:, None]
            arrays[clip_id] = encode_clip(disp, valid, bound)
            grids.append(flow.shape[1:3])
            n_valid += int(valid.sum())
            n_total += valid.size
    meta = {"__bound__": np.float32(bound), "__spacing__": np.int32(spacing),
            "__clips__": np.asarray(list(arrays), dtype=str),
            "__grids__": np.asarray(grids, dtype=np.int32).reshape(-1, 2)}
    save_npz_atomic(out_path, {**arrays, **meta}, compressed=True)
    return {"clips": len(arrays), "valid_fraction": n_valid / max(n_total, 1)}
