"""Motion boxes: one box per frame from the motion map (the authors' rule, reference section 1).

Per frame (``box_from_map``), on the map grid:

1. Gaussian ``smooth_sigma``;
2. values below ``rel_max_threshold`` x frame max -> 0, then values below ``std_threshold`` x
   the standard deviation of what is left -> 0 (sequentially, as written in the reference);
3. Gaussian ``blur_sigma`` x map height / ``blur_sigma_reference_height`` (the authors' 30 px
   was for 240-px-high flow), which merges nearby boundary fragments into blobs;
4. binarise, ``cv2.findContours`` (external contours, Suzuki border following);
5. the largest contour by area, plus the second largest when their centres are closer than
   ``two_contour_max_distance`` x frame diagonal (hands + object in the authors' data);
6. the bounding box of the filled contour(s) = the union of their bounding rectangles.

Binarisation: findContours treats every non-zero pixel as foreground and accepts only integer
images (8-bit, or 32-bit for RETR_CCOMP/FLOODFILL), so the authors' blurred float map must have
been cast to integers first: in effect a cut at 1 in their uint8-quantised flow units. A float
Gaussian of sigma s is non-zero up to 4 s from any surviving pixel (OpenCV's kernel radius), so
``> 0`` on a float map would grow every box by 4 s (120 px at 240 px height), nearly always
past the 0.7 clean-up limits, and their absolute integer cut does not carry over to float
flow. We therefore binarise at ``binarize_threshold`` x the blurred frame's maximum (a
relative cut, like the other two thresholds); ``binarize_threshold: 0`` gives the literal
``> 0`` rule. ``method: faithful`` (``mofo.motion.faithful``) keeps their integer cut instead,
on a map computed in their units. On 16 demo clips with ground truth (TV-L1, window 8) the mean IoU was 0.29 /
0.46 / 0.66 / 0.60 / 0.36 for 0.3 / 0.5 / 0.7 / 0.8 / 0.9, so the default is 0.7.

Frames whose map maximum is below ``min_motion`` (flow px per px) have no contour: relative
thresholds would otherwise turn an all-but-empty map into a confident box. A clip whose whole
map is below it is a *static clip*: every frame gets the centre box, source ``static_clip``.
This catches frozen, blank or duplicated-frame clips; it cannot tell flow noise from motion.

Fallbacks, in order (``resolve_boxes``):

a. no contour: the first frame gets the centre box (w/4..3w/4, h/4..3h/4, source ``centre``),
   a later frame the previous frame's box (``previous``) — the authors' step 3;
b. clean-up (authors' step 4): a box wider than ``max_width`` x w, taller than ``max_height`` x
   h or smaller than ``min_area`` x h x w is replaced by the next frame's (already cleaned) box
   (``next``), so a run of bad boxes takes the first good box after it. A bad box at the last
   frame — and so a run of bad boxes that reaches the end — takes the nearest earlier good
   box (``previous``); a clip with no good box at all gets the centre box (``centre``).
c. a clip where no frame kept a box of its own (every frame fell back) is a whole-clip
   fallback: centre boxes, source ``clip_fallback``, counted per clip in the shard report
   (``clips_fallback``; ``clips_detected`` counts clips with at least one detected frame).

Boxes are (x1, y1, x2, y2) integers with exclusive x2/y2, in map pixels; ``boxes_shard``
converts them to the ORIGINAL video's pixels.

``method: faithful`` replaces steps 1-6 by the authors' rule as published and pins all its
numbers (``mofo.motion.faithful``; it needs ``motion_map.method: faithful``): this section's
other keys are not read, there is no static-clip test and no temporal median.

``method: mass`` (the real-data default, made for the ``residual`` motion map, see
``mass_box``) replaces steps 1-6: a threshold that adapts to each frame's motion
distribution, blobs merged by distance, the heaviest group kept, and the box that holds its
central mass. ``temporal_median`` then smooths the final boxes over that many frames.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from mofo.formats.boxfile import BOX_COLUMNS  # the columns this stage writes (one home)
from mofo.motion.faithful import AUTHORS_CLEANUP, faithful_box, two_contour_box
from mofo.paths import beside

Box = tuple[int, int, int, int]


def centre_box(height: int, width: int) -> Box:
    """The fallback box: the central half of the frame in each direction."""
    return (width // 4, height // 4, width - width // 4, height - height // 4)


def scaled_blur_sigma(boxes_cfg: dict, height: int) -> float:
    """``blur_sigma`` scaled from ``blur_sigma_reference_height`` to a map ``height``."""
    ref = float(boxes_cfg["blur_sigma_reference_height"])
    sigma = float(boxes_cfg["blur_sigma"])
    return sigma * height / ref if ref > 0 else sigma


def box_from_map(m: np.ndarray, boxes_cfg: dict) -> Box | None:
    """One frame's motion map (h, w) -> its motion box in map pixels, or None without contour."""
    m = np.asarray(m, dtype=np.float32)
    h, w = m.shape
    if not np.isfinite(m).all():
        m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    if float(m.max(initial=0.0)) < float(boxes_cfg["min_motion"]):
        return None
    s = float(boxes_cfg["smooth_sigma"])
    if s > 0:
        m = cv2.GaussianBlur(m, (0, 0), s)
    m = m.copy()
    m[m < float(boxes_cfg["rel_max_threshold"]) * m.max()] = 0
    m[m < float(boxes_cfg["std_threshold"]) * m.std()] = 0
    b = scaled_blur_sigma(boxes_cfg, h)
    if b > 0:
        # Zero outside the frame: reflecting would invent motion mass at the border.
        m = cv2.GaussianBlur(m, (0, 0), b, borderType=cv2.BORDER_CONSTANT)
    peak = float(m.max(initial=0.0))
    if peak <= 0:
        return None
    binary = (m > float(boxes_cfg["binarize_threshold"]) * peak).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    return two_contour_box(contours, h, w, float(boxes_cfg["two_contour_max_distance"]))


def mass_box(m: np.ndarray, boxes_cfg: dict) -> Box | None:
    """One frame's motion map (h, w) -> the box of its moving region, or None (``method:
    mass``).

    1. threshold = max(``min_motion``, median + ``mass_mad_k`` x 1.4826 MAD of the frame's
       map, ``rel_max_threshold`` x its max): the background's own level, not a
       fixed fraction, decides what moves; weights = map - threshold where positive;
    2. blobs closer than ``mass_merge`` x frame diagonal are grouped (dilation), and the groups
       holding at least ``mass_keep`` x the heaviest group's weight are kept (a hand and the
       object it moves are one group; a far-away walker is not);
    3. the box spans the weights' ``mass_quantile`` .. 1 - ``mass_quantile`` quantiles in x
       and in y, so a few stray pixels do not stretch it.
    """
    m = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    h, w = m.shape
    values = m.ravel()
    if values.size == 0 or float(values.max()) < float(boxes_cfg["min_motion"]):
        return None
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    threshold = max(float(boxes_cfg["min_motion"]),
                    med + float(boxes_cfg["mass_mad_k"]) * 1.4826 * mad,
                    float(boxes_cfg["rel_max_threshold"]) * float(values.max()))
    weights = np.clip(m - threshold, 0.0, None)
    if float(weights.sum()) <= 0:
        return None
    radius = max(1, round(float(boxes_cfg["mass_merge"]) * math.hypot(h, w)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    _, labels = cv2.connectedComponents(cv2.dilate((weights > 0).astype(np.uint8), kernel))
    mass = np.bincount(labels.ravel(), weights=weights.ravel().astype(np.float64))
    mass[0] = 0.0
    keep = np.flatnonzero(mass >= float(boxes_cfg["mass_keep"]) * mass.max())
    weights = np.where(np.isin(labels, keep), weights, 0.0)
    q = float(boxes_cfg["mass_quantile"])
    total = float(weights.sum())
    cx = np.cumsum(weights.sum(axis=0)) / total
    cy = np.cumsum(weights.sum(axis=1)) / total
    x1, x2 = int(np.searchsorted(cx, q)), int(np.searchsorted(cx, 1 - q)) + 1
    y1, y2 = int(np.searchsorted(cy, q)), int(np.searchsorted(cy, 1 - q)) + 1
    return (x1, y1, min(x2, w), min(y2, h))


def temporal_median(boxes: list[Box], window: int) -> list[Box]:
    """Each coordinate replaced by its median over ``window`` frames centred on the frame
    (edges repeat the end frames); window <= 1 returns the boxes unchanged."""
    if window <= 1 or len(boxes) < 2:
        return boxes
    arr = np.asarray(boxes, dtype=np.float64)
    pad = window // 2
    padded = np.concatenate([np.repeat(arr[:1], pad, 0), arr, np.repeat(arr[-1:], window - 1 - pad, 0)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)
    return [tuple(int(round(v)) for v in row) for row in np.median(windows, axis=-1)]


def box_is_bad(box: Box, height: int, width: int, boxes_cfg: dict) -> bool:
    """The clean-up test: too wide, too tall, or too small a share of the frame."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    return (
        bw > float(boxes_cfg["max_width"]) * width
        or bh > float(boxes_cfg["max_height"]) * height
        or bw * bh < float(boxes_cfg["min_area"]) * height * width
    )


def resolve_boxes(
    raw: list[Box | None], height: int, width: int, boxes_cfg: dict
) -> tuple[list[Box], list[str]]:
    """Apply the fallbacks and the clean-up (module docstring) to per-frame contour boxes.

    ``raw[i]`` is the contour box of frame i or None. Returns (boxes, sources).
    """
    n = len(raw)
    centre = centre_box(height, width)
    boxes: list[Box] = []
    sources: list[str] = []
    for i, box in enumerate(raw):  # step a: no contour -> centre / previous
        if box is not None:
            boxes.append(box)
            sources.append("detected")
        elif i == 0:
            boxes.append(centre)
            sources.append("centre")
        else:
            boxes.append(boxes[-1])
            sources.append("previous")
    bad = [box_is_bad(b, height, width, boxes_cfg) for b in boxes]
    final = list(boxes)
    for i in range(n - 1, -1, -1):  # step b: bad -> next frame's cleaned box
        if not bad[i]:
            continue
        if i < n - 1:
            final[i], sources[i] = final[i + 1], "next"
        else:
            good = [j for j in range(n - 1) if not bad[j]]
            if good:
                final[i], sources[i] = boxes[good[-1]], "previous"
            else:
                final[i], sources[i] = centre, "centre"
    return final, sources


def boxes_for_clip(maps: np.ndarray, n_frames: int, boxes_cfg: dict) -> pd.DataFrame:
    """Boxes of every frame of a clip from its motion maps (T-1, h, w), in map pixels.

    Frame i uses map i; the last frame reuses the last map. A zero-length ``maps`` (clip
    without flow) gives centre boxes. ``boxes_cfg["method"]`` picks the per-frame rule
    (``contours``: ``box_from_map``, ``mass``: ``mass_box``, ``faithful``: the authors'
    ``faithful_box`` with their clean-up limits and nothing else of ``boxes_cfg``). Columns: frame, x1, y1, x2, y2, detected, source.
    """
    if maps.ndim != 3:
        raise ValueError(f"motion maps must be (T-1, h, w), got shape {maps.shape}")
    _, h, w = maps.shape
    if n_frames <= 0:
        return _frame_df([], [])
    if maps.shape[0] == 0:
        return _frame_df([centre_box(h, w)] * n_frames, ["centre"] * n_frames)
    last = maps.shape[0] - 1
    if boxes_cfg["method"] == "faithful":  # the authors' rule: no static-clip test, no median
        raw = [faithful_box(maps[min(i, last)]) for i in range(n_frames)]
        cleanup, median = AUTHORS_CLEANUP, 1
    else:
        if float(np.nanmax(maps)) < float(boxes_cfg["min_motion"]):
            return _frame_df([centre_box(h, w)] * n_frames, ["static_clip"] * n_frames)
        detect = mass_box if boxes_cfg["method"] == "mass" else box_from_map
        raw = [detect(maps[min(i, last)], boxes_cfg) for i in range(n_frames)]
        cleanup, median = boxes_cfg, int(boxes_cfg["temporal_median"])
    boxes, sources = resolve_boxes(raw, h, w, cleanup)
    if "detected" not in sources:  # no frame kept a box of its own: say so for the clip
        return _frame_df([centre_box(h, w)] * n_frames, ["clip_fallback"] * n_frames)
    return _frame_df(temporal_median(boxes, median), sources)


def _frame_df(boxes: list[Box], sources: list[str]) -> pd.DataFrame:
    arr = np.array(boxes, dtype=np.int64).reshape(-1, 4)
    return pd.DataFrame(
        {
            "frame": np.arange(len(boxes), dtype=np.int64),
            "x1": arr[:, 0],
            "y1": arr[:, 1],
            "x2": arr[:, 2],
            "y2": arr[:, 3],
            "detected": [s == "detected" for s in sources],
            "source": sources,
        }
    )


def scale_boxes(
    df: pd.DataFrame, map_size: tuple[int, int], out_size: tuple[int, int]
) -> pd.DataFrame:
    """Map-pixel boxes -> pixels of a frame of ``out_size`` (h, w): x1/y1 rounded down and
    x2/y2 up so the scaled box still covers the map cells, clipped to the frame."""
    mh, mw = map_size
    oh, ow = out_size
    sx, sy = ow / mw, oh / mh
    out = df.copy()
    # The small epsilon keeps exact multiples (e.g. 16 * 2.0) from rounding outwards.
    out["x1"] = np.clip(np.floor(df["x1"] * sx + 1e-6), 0, ow).astype(np.int64)
    out["y1"] = np.clip(np.floor(df["y1"] * sy + 1e-6), 0, oh).astype(np.int64)
    out["x2"] = np.clip(np.ceil(df["x2"] * sx - 1e-6), 0, ow).astype(np.int64)
    out["y2"] = np.clip(np.ceil(df["y2"] * sy - 1e-6), 0, oh).astype(np.int64)
    return out


def _empty_report() -> dict:
    return {
        "clips": 0,
        "frames": 0,
        "detected": 0,
        "centre": 0,
        "previous": 0,
        "next": 0,
        "static_clip": 0,
        "clip_fallback": 0,
        "static_clips": 0,
        "clips_no_flow": 0,
        "clips_fallback": 0,
        "clips_detected": 0,
        "clips_failed": 0,
    }


def _count(report: dict, df: pd.DataFrame, no_flow: bool) -> None:
    report["clips"] += 1
    report["frames"] += len(df)
    for source, k in df["source"].value_counts().items():
        report[source] = report.get(source, 0) + int(k)
    report["static_clips"] += int(len(df) > 0 and (df["source"] == "static_clip").all())
    report["clips_no_flow"] += int(no_flow)
    report["clips_fallback"] += int(len(df) > 0 and (df["source"] == "clip_fallback").all())
    report["clips_detected"] += int((df["source"] == "detected").any())


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def report_path(out_csv: str | Path) -> Path:
    """``boxes/shard-0000.csv`` -> ``boxes/shard-0000.report.json`` (``mofo.paths.BESIDE``)."""
    return Path(beside(out_csv, "boxes_report"))


def rawflow_csv_path(out_csv: str | Path) -> Path:
    """``boxes/shard-0000.csv`` -> ``boxes/shard-0000.rawflow.csv`` (raw-flow baseline boxes)."""
    return Path(beside(out_csv, "raw_flow_boxes"))


def _boxes_for_store(maps_npz, store, boxes_cfg: dict, desc: str) -> tuple[pd.DataFrame, dict]:
    report = _empty_report()
    frames: list[pd.DataFrame] = []
    for clip_id in tqdm(list(store.clip_ids), desc=desc, file=sys.stderr):
        try:
            meta = store.meta(clip_id)
            n = int(store.num_frames(clip_id))
            key = str(clip_id)
            maps = maps_npz[key].astype(np.float32) if key in maps_npz.files else None
            no_flow = maps is None or maps.shape[0] == 0
            if maps is None:  # flow failed for this clip: centre boxes on the stored frame grid
                maps = np.zeros((0, int(meta["height"]), int(meta["width"])), dtype=np.float32)
            df = boxes_for_clip(maps, n, boxes_cfg)
            df = scale_boxes(df, maps.shape[1:], (int(meta["src_height"]), int(meta["src_width"])))
        except Exception as exc:  # one bad clip must not lose the shard
            print(f"[boxes] {desc}: clip {clip_id}: {exc}", file=sys.stderr)
            report["clips_failed"] += 1
            continue
        _count(report, df, no_flow)
        df.insert(0, "clip_id", key)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BOX_COLUMNS)
    return out[BOX_COLUMNS], report


def boxes_shard(
    map_path: str | Path,
    frames_prefix: str | Path,
    out_csv: str | Path,
    boxes_cfg: dict,
    raw_map_path: str | Path | None = None,
) -> dict:
    """Boxes for every clip of a decoded shard -> ``boxes/shard-XXXX.csv`` (original video
    pixels, columns ``BOX_COLUMNS``) and ``boxes/shard-XXXX.report.json`` (counts).

    Every clip in the frame store gets a box for each of its frames; clips missing from the
    map file (flow failed) get centre boxes and are counted in ``clips_no_flow``.
    With ``raw_map_path`` (the raw-flow maps written by ``motion_map_shard(raw_flow_out=...)``)
    the same rule also runs on them and writes ``shard-XXXX.rawflow.csv``; its counts go into
    the report under ``"raw_flow"``. Returns the report dict.
    """
    from mofo.formats.framestore import FrameStore  # imported here: array-level code needs none

    store = FrameStore(frames_prefix)
    out_csv = Path(out_csv)
    with np.load(map_path) as maps_npz:
        df, report = _boxes_for_store(maps_npz, store, boxes_cfg, f"boxes {out_csv.stem}")
    report["map_path"] = str(map_path)
    if raw_map_path is not None:
        with np.load(raw_map_path) as raw_npz:
            raw_df, raw_report = _boxes_for_store(
                raw_npz, store, boxes_cfg, f"raw-flow boxes {out_csv.stem}"
            )
        _write_atomic(rawflow_csv_path(out_csv), lambda p: raw_df.to_csv(p, index=False))
        report["raw_flow"] = raw_report
    _write_atomic(out_csv, lambda p: df.to_csv(p, index=False))
    _write_atomic(report_path(out_csv), lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    return report
