"""How good are the motion boxes? IoU against ground truth, in pixels and on the token grid.

Two measures per frame, averaged per clip, then over clips (each clip weighs the same):

* ``box_iou``: the usual intersection over union of (x1, y1, x2, y2) boxes, x2/y2 exclusive.
* ``token_grid_iou``: what the model actually sees. Both boxes are mapped into the evaluation
  view of the model input — resize so the short side is ``input_size`` (the long side rounded
  as ``mofo.inputs.transforms.resize_short_side`` does), then the centred ``input_size`` square
  crop (``center_crop``) — and each box becomes the set of ``patch_size`` token cells it
  overlaps (``mofo.masking.grid.inbox_tokens``, the same rule the MOFO masking uses). The
  measure is the IoU of the two cell sets; two boxes that both miss the crop agree (1.0).

``box_quality`` also scores the raw-flow baseline (the same box rule run on the flow
magnitude instead of motion boundaries, ``boxes/shard-XXXX.rawflow.csv``) and the centre box,
splits every figure by the clip's ``camera_motion`` flag, and sums the fallback counts of the
shard reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mofo.formats.boxfile import BOX_COORDS, FRAME_BOX_COLUMNS
from mofo.inputs.transforms import short_side_size, spatial_crop_offset
from mofo.masking.grid import inbox_tokens
from mofo.motion.boxes import report_path


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0 when they do not meet or one is empty."""
    return float(box_iou_many(np.asarray([box_a], float), np.asarray([box_b], float))[0])


def box_iou_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (N, 4) box arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def evaluation_view(frame_size: tuple[int, int], input_size: int) -> tuple[float, float, int, int]:
    """(scale_x, scale_y, x0, y0): frame pixels -> the evaluation crop, from the geometry of
    ``resize_short_side`` + ``center_crop`` (``mofo.inputs.transforms``, its one home)."""
    height, width = int(frame_size[0]), int(frame_size[1])
    out_w, out_h = short_side_size(width, height, input_size)
    x0, y0 = spatial_crop_offset(out_w, out_h, input_size)
    return out_w / width, out_h / height, x0, y0


def token_cells(
    boxes: np.ndarray, frame_size: tuple[int, int], input_size: int, patch_size: int
) -> np.ndarray:
    """bool (N, g, g): the token cells each of N frame-pixel boxes covers in the evaluation view."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy, x0, y0 = evaluation_view(frame_size, input_size)
    crop = boxes * np.array([sx, sy, sx, sy]) - np.array([x0, y0, x0, y0])
    g = input_size // patch_size
    if len(crop) == 0:
        return np.zeros((0, g, g), bool)
    cells = inbox_tokens(crop, len(crop), input_size, patch_size, 1)
    return cells.reshape(len(crop), g, g)


def token_grid_iou_many(
    a: np.ndarray, b: np.ndarray, frame_size: tuple[int, int], input_size: int, patch_size: int
) -> np.ndarray:
    """Row-wise token-grid IoU of two (N, 4) frame-pixel box arrays."""
    ca = token_cells(a, frame_size, input_size, patch_size)
    cb = token_cells(b, frame_size, input_size, patch_size)
    inter = (ca & cb).sum(axis=(1, 2))
    union = (ca | cb).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def token_grid_iou(
    box_a: Sequence[float],
    box_b: Sequence[float],
    frame_size: tuple[int, int],
    input_size: int,
    patch_size: int,
) -> float:
    """IoU of the token cells two boxes cover at the model input (module docstring).

    ``frame_size`` is (height, width) of the frame the boxes are given in.
    """
    return float(
        token_grid_iou_many(
            np.asarray([box_a]), np.asarray([box_b]), frame_size, input_size, patch_size
        )[0]
    )


# --------------------------------------------------------------------------------------------
# Reading the inputs


def _read_boxes(paths: Iterable[str | Path], what: str) -> pd.DataFrame:
    frames = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{what} file not found: {path}")
        df = pd.read_csv(path, dtype={"clip_id": str})
        missing = [c for c in FRAME_BOX_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=FRAME_BOX_COLUMNS)
    return pd.concat(frames, ignore_index=True)


_NO_CAMERA_MOTION = {"none", "false", "0", "no", "f", "static", ""}


def camera_moves(value) -> bool:
    """The clip's ``camera_motion`` as a flag: booleans as they are; the demo's strings
    ``none`` (and false-like strings) are False, any other kind (``pan``, ``shake``) True."""
    if isinstance(value, str):
        return value.strip().lower() not in _NO_CAMERA_MOTION
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


def _frame_sizes(
    clips: pd.DataFrame, frames_prefixes: Iterable[str | Path] | None, clips_csv: Path
) -> dict[str, tuple[int, int]]:
    """(height, width) of each clip's ORIGINAL video: from the frame store indexes when
    given (no video decoding), else from the video files named in clips.csv."""
    sizes: dict[str, tuple[int, int]] = {}
    if frames_prefixes:
        from mofo.formats.framestore import read_index

        for prefix in frames_prefixes:
            idx = read_index(prefix).drop_duplicates("clip_id")
            for row in idx.itertuples():
                sizes[str(row.clip_id)] = (int(row.src_height), int(row.src_width))
        return sizes
    import cv2

    for row in clips.itertuples():
        path = Path(row.video_path)
        if not path.is_absolute() and not path.exists():
            path = clips_csv.parent / path
        cap = cv2.VideoCapture(str(path))
        h, w = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        cap.release()
        if h <= 0 or w <= 0:
            raise ValueError(
                f"{clips_csv}: cannot read the frame size of clip {row.clip_id} from {path}"
            )
        sizes[str(row.clip_id)] = (h, w)
    return sizes


# --------------------------------------------------------------------------------------------
# Scoring


def _per_clip_scores(
    pred: pd.DataFrame, gt: pd.DataFrame, sizes: dict[str, tuple[int, int]], model_cfg: dict
) -> pd.DataFrame:
    """One row per clip: mean pixel IoU and token-grid IoU of ``pred`` against ``gt``."""
    merged = gt.merge(pred, on=["clip_id", "frame"], suffixes=("_gt", ""), how="inner")
    rows = []
    for clip_id, g in merged.groupby("clip_id", sort=False):
        a = g[BOX_COORDS].to_numpy(float)
        b = g[[c + "_gt" for c in BOX_COORDS]].to_numpy(float)
        if clip_id not in sizes:
            raise ValueError(f"no frame size known for clip {clip_id}")
        tok = token_grid_iou_many(
            a, b, sizes[clip_id], int(model_cfg["input_size"]), int(model_cfg["patch_size"])
        )
        rows.append(
            {
                "clip_id": clip_id,
                "iou": box_iou_many(a, b).mean(),
                "token": tok.mean(),
                "frames": len(g),
            }
        )
    return pd.DataFrame(rows, columns=["clip_id", "iou", "token", "frames"])


def _centre_boxes(gt: pd.DataFrame, sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    out = gt[["clip_id", "frame"]].copy()
    hw = np.array([sizes[c] for c in out["clip_id"]]).reshape(-1, 2)
    h, w = hw[:, 0], hw[:, 1]
    out["x1"], out["y1"] = w // 4, h // 4
    out["x2"], out["y2"] = w - w // 4, h - h // 4
    return out


def _mean(x: pd.Series) -> float | None:
    return float(x.mean()) if len(x) else None


def _summary(scores: dict[str, pd.DataFrame], clip_ids: Sequence[str]) -> dict:
    ours = scores["ours"].set_index("clip_id").reindex(clip_ids).dropna(subset=["iou"])
    out = {
        "n_clips": len(ours),
        "n_frames": int(ours["frames"].sum()) if len(ours) else 0,
        "mean_iou": _mean(ours["iou"]),
        "token_grid_iou": _mean(ours["token"]),
    }
    for name in ("raw_flow", "centre_box"):
        if name in scores:
            s = scores[name].set_index("clip_id").reindex(clip_ids).dropna(subset=["iou"])
            out[f"{name}_mean_iou"] = _mean(s["iou"])
            out[f"{name}_token_grid_iou"] = _mean(s["token"])
    return out


def _sum_reports(paths: Iterable[str | Path]) -> dict:
    total: dict = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        for key, value in report.items():
            if isinstance(value, dict):
                sub = total.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        sub[k] = sub.get(k, 0) + v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def box_quality(
    boxes_csvs: Sequence[str | Path],
    clips_csv: str | Path | None,
    gt_boxes_csv: str | Path | None,
    model_cfg: dict,
    raw_flow_boxes: Sequence[str | Path] | None = None,
    frames_prefixes: Sequence[str | Path] | None = None,
    reports: Sequence[str | Path] | None = None,
) -> dict:
    """Score the motion boxes against ground truth.

    ``boxes_csvs``: ``boxes/shard-XXXX.csv`` files; ``clips_csv`` (the demo's clips.csv or a
    manifest) needs ``clip_id`` (and ``video_path`` when ``frames_prefixes`` is not given);
    with a ``camera_motion`` column the scores are also split by it;
    ``gt_boxes_csv``: ``clip_id, frame, x1, y1, x2, y2`` in original pixels;
    ``raw_flow_boxes``: the ``boxes/shard-XXXX.rawflow.csv`` files (optional);
    ``frames_prefixes``: the frame stores, used for each clip's original frame size;
    ``reports``: shard reports (default: next to each boxes CSV).
    Only clips with ground truth count. Without ground truth (real datasets: ``clips_csv`` and
    ``gt_boxes_csv`` None) the result has the clip/frame counts and the summed fallbacks only.
    Returns the dict written by ``write_box_quality``.
    """
    report_files = reports if reports is not None else [report_path(p) for p in boxes_csvs]
    if gt_boxes_csv is None or clips_csv is None:
        pred = _read_boxes(boxes_csvs, "motion boxes")
        return _clean({
            "n_clips": int(pred["clip_id"].nunique()),
            "n_frames": int(len(pred)),
            "ground_truth": None,
            "fallbacks": _sum_reports(report_files),
        })
    clips_csv = Path(clips_csv)
    clips = pd.read_csv(clips_csv, dtype={"clip_id": str})
    if "clip_id" not in clips.columns:
        raise ValueError(f"{clips_csv}: missing column 'clip_id'")
    gt = _read_boxes([gt_boxes_csv], "ground-truth boxes")
    pred = _read_boxes(boxes_csvs, "motion boxes")
    gt_clips = [c for c in clips["clip_id"] if c in set(gt["clip_id"])]
    sizes = _frame_sizes(clips[clips["clip_id"].isin(gt_clips)], frames_prefixes, clips_csv)
    gt = gt[gt["clip_id"].isin(sizes)]

    scores = {"ours": _per_clip_scores(pred, gt, sizes, model_cfg)}
    scores["centre_box"] = _per_clip_scores(_centre_boxes(gt, sizes), gt, sizes, model_cfg)
    if raw_flow_boxes:
        raw = _read_boxes(raw_flow_boxes, "raw-flow boxes")
        scores["raw_flow"] = _per_clip_scores(raw, gt, sizes, model_cfg)

    result = _summary(scores, gt_clips)
    result["n_clips_with_ground_truth"] = len(gt_clips)
    result["n_clips_without_boxes"] = len(gt_clips) - result["n_clips"]
    if "camera_motion" in clips.columns:  # the demo's clips.csv; a manifest has none
        result.update(_by_camera_motion(scores, clips, gt_clips))
    result["model_view"] = {
        "input_size": int(model_cfg["input_size"]),
        "patch_size": int(model_cfg["patch_size"]),
        "view": "resize short side to input_size, centre crop input_size x input_size",
    }
    result["fallbacks"] = _sum_reports(report_files)
    return _clean(result)


def _by_camera_motion(scores: dict, clips: pd.DataFrame, gt_clips: list[str]) -> dict:
    """The summary split by the clips' ``camera_motion`` flag and by its kind."""
    camera = dict(zip(clips["clip_id"], (camera_moves(v) for v in clips["camera_motion"])))
    kinds = dict(zip(clips["clip_id"], clips["camera_motion"].astype(str)))
    return {
        "by_camera_motion": {
            key: _summary(scores, [c for c in gt_clips if camera[c] is flag])
            for key, flag in (("true", True), ("false", False))
        },
        "by_camera_motion_kind": {
            kind: _summary(scores, [c for c in gt_clips if kinds[c] == kind])
            for kind in sorted({kinds[c] for c in gt_clips})
        },
    }


def _clean(obj):
    """NaN -> None so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_box_quality(out_json: str | Path, *args, **kwargs) -> dict:
    """``box_quality(*args, **kwargs)`` written to ``out_json`` (e.g. motion/box_quality.json)."""
    result = box_quality(*args, **kwargs)
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(out_json.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out_json)
    return result
