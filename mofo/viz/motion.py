"""Pictures of the motion stages: frame | flow | motion map | frame with boxes, a row per frame.

Plain OpenCV drawing (no matplotlib figure per clip) so a shard's pictures take milliseconds.
Flow is drawn on the usual HSV colour wheel (hue = direction, brightness = speed, scaled by
the clip's largest speed); the motion map with the ``inferno`` colour map scaled by the clip's
largest value. Boxes: ours green, ground truth red, raw-flow baseline blue.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

GREEN, RED, BLUE = (0, 200, 0), (230, 30, 30), (40, 90, 255)  # RGB


def flow_to_rgb(flow: np.ndarray, max_speed: float | None = None) -> np.ndarray:
    """(h, w, 2) flow -> uint8 RGB (h, w, 3) on the HSV colour wheel."""
    u, v = flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32)
    mag, ang = cv2.cartToPolar(u, v, angleInDegrees=True)
    top = float(max_speed) if max_speed else float(mag.max())
    hsv = np.zeros(flow.shape[:2] + (3,), np.uint8)
    hsv[..., 0] = (ang / 2).astype(np.uint8)  # OpenCV hue is 0..179
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(mag / max(top, 1e-6) * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def map_to_rgb(m: np.ndarray, top: float | None = None) -> np.ndarray:
    """(h, w) motion map -> uint8 RGB with the inferno colour map."""
    top = float(top) if top else float(np.max(m))
    gray = np.clip(m.astype(np.float32) / max(top, 1e-6) * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def _draw_box(img: np.ndarray, box: Sequence[float] | None, colour: tuple[int, int, int]) -> None:
    if box is None or not np.all(np.isfinite(box)):
        return
    x1, y1, x2, y2 = (round(c) for c in box)
    cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), colour, 1)


def draw_clip_panel(
    frames: np.ndarray,
    maps: np.ndarray,
    boxes: np.ndarray,
    flow: np.ndarray | None = None,
    gt_boxes: np.ndarray | None = None,
    raw_boxes: np.ndarray | None = None,
    rows: int = 4,
    cell_height: int = 96,
) -> np.ndarray:
    """One picture of a clip: ``rows`` evenly spaced frames, each row
    frame | flow (if given) | motion map | frame with boxes. uint8 RGB.

    ``frames`` (T, H, W, 3); ``maps`` (T-1, h, w) (may be empty); ``flow`` (T-1, h, w, 2);
    box arrays (T, 4) in the pixels of ``frames`` (NaN rows = no box).
    """
    t, height, width, _ = frames.shape
    scale = cell_height / height
    cw, ch = max(1, round(width * scale)), cell_height
    picks = np.unique(np.linspace(0, t - 1, num=min(rows, t)).round().astype(int))
    flow_top = float(np.abs(flow).max()) if flow is not None and flow.size else None
    map_top = float(maps.max()) if maps.size else None
    out_rows = []
    for i in picks:
        j = min(i, maps.shape[0] - 1)  # the last frame reuses the last map
        frame = cv2.resize(frames[i], (cw, ch), interpolation=cv2.INTER_AREA)
        cells = [frame]
        if flow is not None:
            cells.append(_resize(flow_to_rgb(flow[j], flow_top) if j >= 0 else None, cw, ch))
        cells.append(_resize(map_to_rgb(maps[j], map_top) if j >= 0 else None, cw, ch))
        boxed = frame.copy()
        for arr, colour in ((gt_boxes, RED), (raw_boxes, BLUE), (boxes, GREEN)):
            if arr is not None:
                _draw_box(boxed, np.asarray(arr[i], float) * scale, colour)
        cells.append(boxed)
        out_rows.append(np.concatenate(_with_gaps(cells, axis=1), axis=1))
    return np.concatenate(_with_gaps(out_rows, axis=0), axis=0)


def _resize(img: np.ndarray | None, w: int, h: int) -> np.ndarray:
    if img is None:
        return np.zeros((h, w, 3), np.uint8)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)


def _with_gaps(parts: list[np.ndarray], axis: int, gap: int = 2) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for k, p in enumerate(parts):
        if k:
            shape = list(p.shape)
            shape[axis] = gap
            out.append(np.full(shape, 255, np.uint8))
        out.append(p)
    return out


def _clip_boxes(
    df: pd.DataFrame | None, clip_id: str, n: int, sx: float, sy: float
) -> np.ndarray | None:
    """(n, 4) boxes of a clip from a boxes table (original pixels) scaled to frame pixels."""
    if df is None:
        return None
    rows = df[df["clip_id"] == clip_id]
    if rows.empty:
        return None
    out = np.full((n, 4), np.nan)
    frames = rows["frame"].to_numpy(int)
    keep = (frames >= 0) & (frames < n)
    out[frames[keep]] = rows[["x1", "y1", "x2", "y2"]].to_numpy(float)[keep] * [sx, sy, sx, sy]
    return out


def _read(path: str | Path | None) -> pd.DataFrame | None:
    if path is None or not Path(path).exists():
        return None
    return pd.read_csv(path, dtype={"clip_id": str})


def write_shard_pictures(
    frames_prefix: str | Path,
    map_path: str | Path,
    boxes_csv: str | Path,
    out_dir: str | Path,
    n_clips: int = 2,
    flow_path: str | Path | None = None,
    gt_boxes_csv: str | Path | None = None,
    raw_boxes_csv: str | Path | None = None,
    clip_ids: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<clip_id>.png`` for ``n_clips`` clips of a shard (the first ones, or
    ``clip_ids``). Flow, ground truth and raw-flow boxes are drawn when their files exist
    (flow is usually deleted after the motion map). Returns the written paths."""
    from mofo.formats.framestore import FrameStore

    store = FrameStore(frames_prefix)
    chosen = list(clip_ids) if clip_ids is not None else store.clip_ids[: max(0, int(n_clips))]
    boxes, gt, raw = _read(boxes_csv), _read(gt_boxes_csv), _read(raw_boxes_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flow_npz = np.load(flow_path) if flow_path is not None and Path(flow_path).exists() else None
    written = []
    try:
        with np.load(map_path) as maps_npz:
            for clip_id in tqdm(chosen, desc=f"pictures {Path(map_path).stem}", file=sys.stderr):
                frames = store.read(clip_id)
                meta = store.meta(clip_id)
                sx, sy = meta["width"] / meta["src_width"], meta["height"] / meta["src_height"]
                maps = (
                    maps_npz[clip_id].astype(np.float32)
                    if clip_id in maps_npz.files
                    else np.zeros((0, 8, 8))
                )
                flow = None
                if flow_npz is not None and clip_id in flow_npz.files:
                    flow = flow_npz[clip_id].astype(np.float32)
                n = len(frames)
                panel = draw_clip_panel(
                    frames,
                    maps,
                    _clip_boxes(boxes, clip_id, n, sx, sy),
                    flow=flow,
                    gt_boxes=_clip_boxes(gt, clip_id, n, sx, sy),
                    raw_boxes=_clip_boxes(raw, clip_id, n, sx, sy),
                )
                path = out_dir / f"{clip_id}.png"
                if not cv2.imwrite(str(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"could not write picture {path}")
                written.append(path)
    finally:
        if flow_npz is not None:
            flow_npz.close()
    return written
