"""Point trajectories from the dense flow (MME's motion target), once per dataset.

For every start frame of a clip, points seeded every ``trajectories.spacing`` px of the flow
grid (at cell centres) are followed through ``trajectories.steps`` consecutive flow fields.
Each step reads the flow at the point's current position (bilinear), clips it to
``+-optical_flow.bound`` and moves the point. A point that leaves the grid is invalid from
that step on. The file format (int8 displacements, valid-step counts) is
:mod:`mofo.formats.trajfile`'s.

Differences from MME's released tool: the flow is read as float pixels (their loader adds the
raw uint8 codes, its de-quantisation being commented out), looked up bilinearly instead of at
the nearest pixel, and every start frame is stored (the last ones with fewer or no valid
steps) so that the loader indexes by stored frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mofo.formats.trajfile import encode_clip
from mofo.motion.flow import save_npz_atomic, shard_flows


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


def write_trajectories(flows: Iterable[tuple[str, np.ndarray]], out_path: str | Path,
                       traj_cfg: dict, bound: float) -> dict:
    """Trajectories of every ``(clip_id, flow (T-1, h, w, 2))``, written to ``out_path`` in
    :mod:`mofo.formats.trajfile`'s format.

    ``traj_cfg``: the ``trajectories`` config section (``steps``, ``spacing``); ``bound``:
    ``optical_flow.bound``. Returns ``{"clips": n, "valid_fraction": f}`` (the share of valid
    point steps over all start frames).
    """
    steps, spacing = int(traj_cfg["steps"]), int(traj_cfg["spacing"])
    arrays: dict[str, np.ndarray] = {}
    grids: list[tuple[int, int]] = []
    n_valid = n_total = 0
    for clip_id, flow in flows:
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


def trajectories_shard(frames_prefix: str | Path, out_path: str | Path, traj_cfg: dict,
                       flow_cfg: dict) -> dict:
    """Trajectories of every clip of a decoded shard (``frames/shard-XXXX``), written to
    ``trajectories/shard-XXXX.npz`` (:func:`write_trajectories`; ``flow_cfg``: the
    ``optical_flow`` section).

    The flow is computed again from the frames, as the flow job computes it, and rounded to
    float16 as the flow job stores it: the trajectories are those of the stored flow, bit for
    bit, without reading the temporary flow file. Reading it would make this job a consumer of
    that file, and Snakemake, to rebuild a deleted flow file for a trajectories job added later
    (an MME row after `make demo`), reruns every consumer of the flow and everything after them:
    motion maps, boxes and the pretrainings that read the boxes. One more flow pass per shard,
    for MME pretrainings only, costs less. Clips whose flow fails are left out, as in the flow
    file. Returns :func:`write_trajectories`'s report plus ``failed`` (clip ids).
    """
    from mofo.formats.framestore import FrameStore  # imported here: array-level code needs none

    failed: list[str] = []
    flows = shard_flows(FrameStore(frames_prefix), flow_cfg,
                        f"trajectories {Path(out_path).stem}", failed)
    report = write_trajectories(((c, f.astype(np.float16)) for c, f in flows), out_path,
                                traj_cfg, float(flow_cfg["bound"]))
    return {**report, "failed": failed}
