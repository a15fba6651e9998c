"""Dense optical flow between consecutive frames (the first step of MOFO's motion boxes).

The paper uses TV-L1 (the authors ran the GPU ``denseflow`` tool, bound 20). Here the flow is
computed with OpenCV on the CPU, on grayscale frames resized to ``optical_flow.scale`` of the
stored frame size. The flow is NOT resized back: its values are pixels of the reduced grid,
and every later stage (motion map, boxes) works on that grid; ``boxes_shard`` converts boxes to
original video pixels at the end. This keeps the arrays small and avoids interpolating flow.

Unlike the authors' pipeline, flow is kept as float (float16 on disk) instead of being
quantised to uint8 and re-encoded as lossy mp4 video.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

FLOW_METHODS = ("tvl1", "dis", "farneback")

_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


MIN_FLOW_SIDE = 16  # DIS refuses images under 12 px; TV-L1 pyramids need a few levels too


def flow_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of the grid the flow is computed on: ``scale`` of the frame size, at least
    ``MIN_FLOW_SIDE`` px per side."""
    return max(MIN_FLOW_SIDE, round(height * scale)), max(MIN_FLOW_SIDE, round(width * scale))


def to_gray_small(frames_rgb: np.ndarray, scale: float) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) -> uint8 gray (T, h, w) at ``scale`` of the size (INTER_AREA)."""
    if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3 or frames_rgb.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 RGB (T, H, W, 3), got {frames_rgb.dtype} {frames_rgb.shape}"
        )
    t, height, width, _ = frames_rgb.shape
    h, w = flow_size(height, width, scale)
    out = np.empty((t, h, w), dtype=np.uint8)
    for i in range(t):
        gray = cv2.cvtColor(frames_rgb[i], cv2.COLOR_RGB2GRAY)
        out[i] = (
            gray
            if (h, w) == (height, width)
            else cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)
        )
    return out


def make_flow_fn(flow_cfg: dict) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Return ``fn(prev_gray, next_gray) -> float32 (h, w, 2)`` for ``flow_cfg['method']``.

    The OpenCV objects are created once and reused for every pair (creation is not free for
    TV-L1, and reuse keeps the per-pair cost honest in the benchmark).
    """
    method = flow_cfg["method"]
    if method == "tvl1":
        p = flow_cfg["tvl1"]
        algo = cv2.optflow.DualTVL1OpticalFlow_create(
            tau=float(p["tau"]),
            lambda_=float(p["lambda"]),
            theta=float(p["theta"]),
            nscales=int(p["nscales"]),
            warps=int(p["warps"]),
            epsilon=float(p["epsilon"]),
            innnerIterations=int(p["inner_iterations"]),  # (sic) OpenCV's keyword spelling
            outerIterations=int(p["outer_iterations"]),
            scaleStep=float(p["scale_step"]),
            gamma=float(p["gamma"]),
            medianFiltering=int(p["median_filtering"]),
        )
        return lambda a, b: algo.calc(a, b, None)
    if method == "dis":
        preset = flow_cfg["dis"]["preset"]
        if preset not in _DIS_PRESETS:
            raise ValueError(f"optical_flow.dis.preset: unknown preset {preset!r}")
        algo = cv2.DISOpticalFlow_create(_DIS_PRESETS[preset])
        return lambda a, b: algo.calc(a, b, None)
    if method == "farneback":
        p = flow_cfg["farneback"]
        return lambda a, b: cv2.calcOpticalFlowFarneback(
            a,
            b,
            None,
            float(p["pyr_scale"]),
            int(p["levels"]),
            int(p["winsize"]),
            int(p["iterations"]),
            int(p["poly_n"]),
            float(p["poly_sigma"]),
            0,
        )
    raise ValueError(f"optical_flow.method: unknown method {method!r}; use one of {FLOW_METHODS}")


def compute_flow(frames_rgb: np.ndarray, flow_cfg: dict) -> np.ndarray:
    """Flow of each consecutive pair: uint8 RGB (T, H, W, 3) -> float32 (T-1, h, w, 2).

    ``(h, w)`` is ``flow_size(H, W, scale)``; channel 0 is u (x displacement), 1 is v, in
    pixels of the reduced grid, clipped to +-``bound``. A clip with one frame gives a
    zero-length array (0, h, w, 2) that still carries the grid size.
    """
    gray = to_gray_small(frames_rgb, float(flow_cfg["scale"]))
    t, h, w = gray.shape
    out = np.zeros((max(t - 1, 0), h, w, 2), dtype=np.float32)
    if t < 2:
        return out
    fn = make_flow_fn(flow_cfg)
    for i in range(t - 1):
        out[i] = fn(gray[i], gray[i + 1])
    bound = float(flow_cfg["bound"])
    np.clip(out, -bound, bound, out=out)
    return out


def save_npz_atomic(out_path: str | Path, arrays: dict[str, np.ndarray],
                    compressed: bool = False) -> None:
    """Write ``arrays`` to ``out_path`` (npz, one entry per key; deflated when ``compressed``)
    via a temp file + rename, so a crashed job never leaves a half-written file that
    Snakemake would take as done."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            (np.savez_compressed if compressed else np.savez)(fh, **arrays)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def shard_flows(store, flow_cfg: dict, desc: str,
                failed: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(clip_id, flow)`` of every clip of a ``FrameStore``, in store order, with a progress
    bar; a clip whose frames cannot be read or whose flow fails is skipped (its id appended to
    ``failed``, a message on stderr naming the store), so one bad clip never loses a shard."""
    for clip_id in tqdm(list(store.clip_ids), desc=desc, file=sys.stderr):
        try:
            flow = compute_flow(store.read(clip_id), flow_cfg)
        except Exception as exc:  # one bad clip must not lose the shard
            print(f"[flow] {store.prefix}: clip {clip_id}: {exc}", file=sys.stderr)
            failed.append(str(clip_id))
            continue
        yield str(clip_id), flow


def flow_shard(frames_prefix: str | Path, out_path: str | Path, flow_cfg: dict,
               picture_out: str | Path | None = None, n_picture_clips: int = 0,
               pooled_out: str | Path | None = None) -> dict:
    """Compute the flow of every clip of a decoded shard and write ``flow/shard-XXXX.npz``.

    One float16 array ``(T-1, h, w, 2)`` per clip id. A clip whose frames cannot be read or
    whose flow fails is left out of the file with a message on stderr (later stages count it
    as a clip without flow and fall back to centre boxes); the other clips are kept.
    ``picture_out``: a second, small npz with the flow of the shard's first
    ``n_picture_clips`` clips (the ones ``mofo.viz.motion.write_shard_pictures`` draws), kept
    when the full flow file is deleted. ``pooled_out``: the kept coarse flow of every clip
    (``mofo.formats.tokenflow``: ``optical_flow.pooled_cells`` cells along the short side, frame
    fractions), which flow-guided masking reads. Returns ``{"clips": n, "failed": [clip ids]}``.
    """
    from mofo.formats.framestore import FrameStore  # imported here: array-level code needs none
    from mofo.formats.tokenflow import pool_flow

    store = FrameStore(frames_prefix)
    arrays: dict[str, np.ndarray] = {}
    pooled: dict[str, np.ndarray] = {}
    failed: list[str] = []
    for clip_id, flow in shard_flows(store, flow_cfg, f"flow {Path(out_path).stem}", failed):
        arrays[clip_id] = flow.astype(np.float16)
        if pooled_out is not None:
            pooled[clip_id] = pool_flow(flow, int(flow_cfg["pooled_cells"]))
    save_npz_atomic(out_path, arrays)
    if pooled_out is not None:
        save_npz_atomic(pooled_out, pooled)
    if picture_out is not None:
        chosen = [str(c) for c in store.clip_ids[: max(0, int(n_picture_clips))]]
        save_npz_atomic(picture_out, {c: arrays[c] for c in chosen if c in arrays})
    return {"clips": len(arrays), "failed": failed}
