"""The box files: one home for their columns, and the reader the training dataset uses.

Every box file has one row per frame of a clip, ``clip_id, frame, x1, y1, x2, y2`` in the
ORIGINAL video's pixels (x2, y2 exclusive): :data:`FRAME_BOX_COLUMNS`. The motion_boxes stage
(``mofo.motion.boxes.boxes_shard``: ``boxes/shard-XXXX.csv`` and ``.rawflow.csv``) adds
``detected, source`` (:data:`BOX_COLUMNS`); the demo's ground truth (``gt_boxes.csv``,
``mofo.data.demo``) has just the frame columns.

This lives in ``mofo.data`` (layer 2), not beside the writer in ``mofo.motion.boxes`` (layer
3), because the dataset reads the files and may import only lower layers; the writer and
``mofo.motion.quality`` take the columns from here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: A box: ``x1, y1, x2, y2`` (x2/y2 exclusive).
BOX_COORDS = ["x1", "y1", "x2", "y2"]
#: What every box file has: one box per clip frame (the demo's ``gt_boxes.csv`` is just this).
FRAME_BOX_COLUMNS = ["clip_id", "frame", *BOX_COORDS]
#: ``boxes/shard-XXXX.csv`` / ``.rawflow.csv``: plus whether contours gave the box, and the
#: fallback that gave it otherwise.
BOX_COLUMNS = [*FRAME_BOX_COLUMNS, "detected", "source"]


class BoxFileError(RuntimeError):
    """A box file is missing or malformed; the message names the file."""


def read_boxes(path: Path) -> dict[str, np.ndarray]:
    """``boxes/shard-XXXX.csv`` -> ``{clip_id: float32 (n_frames, 4)}`` in original video
    pixels, row ``f`` = frame ``f``. Frames missing from the file repeat the previous one."""
    if not path.exists():
        raise BoxFileError(f"motion boxes not found: {path} (run the motion_boxes stage)")
    try:
        df = pd.read_csv(path, dtype={"clip_id": str}, usecols=lambda c: c in FRAME_BOX_COLUMNS)
    except pd.errors.EmptyDataError as err:
        raise BoxFileError(f"{path}: empty file") from err
    missing = [c for c in FRAME_BOX_COLUMNS if c not in df.columns]
    if missing:
        raise BoxFileError(f"{path}: missing columns {missing}")
    if df[FRAME_BOX_COLUMNS[1:]].isna().any().any():
        raise BoxFileError(f"{path}: empty values in the box columns")
    out: dict[str, np.ndarray] = {}
    for clip_id, rows in df.groupby("clip_id", sort=False):
        frames = rows["frame"].to_numpy(np.int64)
        if (frames < 0).any():
            raise BoxFileError(f"{path}: clip {clip_id!r} has a negative frame number")
        order = np.argsort(frames, kind="stable")
        frames = frames[order]
        coords = rows[BOX_COORDS].to_numpy(np.float32)[order]
        # row f <- the last listed frame <= f (complete files map 1:1)
        slot = np.searchsorted(frames, np.arange(frames[-1] + 1), side="right") - 1
        out[str(clip_id)] = coords[np.maximum(slot, 0)]
    return out
