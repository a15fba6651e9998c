"""Decode one shard of the manifest into the JPEG frame store (stage ``decode``).

``decode_shard(shard_df, out_prefix, decode_cfg, min_frames)`` writes

* ``<out_prefix>.jpgpack`` and ``<out_prefix>.index.csv`` (see mofo.formats.framestore),
* ``<out_prefix>.status.csv``: ``clip_id, status, n_frames, message`` per manifest row,

and returns the status table. Statuses: ``ok``; ``short`` (decoded, fewer than ``min_frames``
frames, by default 2: no frame pair for flow, so the clip gets centre boxes; kept); ``failed`` (missing / empty / corrupt / truncated
file, zero frames, frame range outside the video: left out of the store, the message names
the file and the problem). One bad clip never stops the shard; a shard where every clip
failed still gets valid empty outputs plus a loud warning, so the rest of the DAG runs.
All three files are written to ``*.tmp`` and renamed, the status file last.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from mofo.data.video import VideoReadError, iter_frames
from mofo.formats.framestore import FrameStoreWriter
from mofo.paths import beside

log = logging.getLogger(__name__)

STATUS_COLUMNS = ["clip_id", "status", "n_frames", "message"]


def status_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.status.csv`` (the name: ``mofo.paths.BESIDE``)."""
    return Path(beside(prefix, "frames_status"))


def decode_clip_into(
    writer: FrameStoreWriter, row: pd.Series, decode_cfg: dict, min_frames: int
) -> dict:
    """Decode one manifest row into ``writer``; return its status row.

    Never raises for a bad video: the problem goes into the status message.
    """
    clip_id = str(row["clip_id"])
    path = str(row["video_path"])
    try:
        info, _idx, note, chunks = iter_frames(
            path,
            start_frame=int(row.get("start_frame", -1)),
            stop_frame=int(row.get("stop_frame", -1)),
            short_side=int(decode_cfg["short_side"]),
            max_frames=int(decode_cfg["max_frames"]),
            threads=int(decode_cfg["threads"]),
        )
        # The manifest's fps (e.g. EPIC video_info) wins over the container's estimate.
        fps = float(row["fps"]) if pd.notna(row.get("fps", float("nan"))) else info.fps
        writer.begin_clip(clip_id, info.height, info.width, fps)
        for chunk in chunks:
            writer.add_frames(chunk)
    except VideoReadError as err:
        writer.abort_clip()
        return dict(clip_id=clip_id, status="failed", n_frames=0, message=str(err))
    except Exception as err:  # anything else a broken file triggers in decord/cv2
        writer.abort_clip()
        return dict(
            clip_id=clip_id,
            status="failed",
            n_frames=0,
            message=f"{path}: {type(err).__name__}: {err}",
        )
    n = writer.end_clip()
    if n < min_frames:
        msg = f"{path}: {n} frames < {min_frames}: no frame pair for flow (centre boxes)"
        return dict(
            clip_id=clip_id,
            status="short",
            n_frames=n,
            message="; ".join(m for m in (msg, note) if m),
        )
    return dict(clip_id=clip_id, status="ok", n_frames=n, message=note)


def decode_shard(
    shard_df: pd.DataFrame, out_prefix: str | os.PathLike, decode_cfg: dict, min_frames: int = 2
) -> pd.DataFrame:
    """Decode every clip of ``shard_df`` (manifest rows) into the frame store at ``out_prefix``.

    ``decode_cfg`` is the ``decode`` config section (``short_side``, ``jpeg_quality``,
    ``max_frames``, ``threads``); ``min_frames``: fewer frames make a clip ``short`` (2 = one
    frame pair for flow). The model's span is checked where it is used: the training loader
    counts the clips shorter than ``model.num_frames * model.sampling_rate`` (and repeats
    their frames), so changing the model never makes these flags stale. Returns the status table.
    """
    out_prefix = str(out_prefix)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    if shard_df["clip_id"].duplicated().any():
        dup = shard_df.loc[shard_df["clip_id"].duplicated(), "clip_id"].iloc[0]
        raise ValueError(f"{out_prefix}: clip_id {dup!r} appears twice in the shard")
    rows = []
    with FrameStoreWriter(
        out_prefix, jpeg_quality=int(decode_cfg["jpeg_quality"])
    ) as writer:
        for _, row in tqdm(
            shard_df.iterrows(),
            total=len(shard_df),
            desc=f"decode {Path(out_prefix).name}",
            unit="clip",
            leave=False,
        ):
            status = decode_clip_into(writer, row, decode_cfg, min_frames)
            if status["status"] == "failed":
                log.warning("decode failed: %s", status["message"])
            rows.append(status)
    status = pd.DataFrame(rows, columns=STATUS_COLUMNS).astype({"n_frames": "int64"})
    status["message"] = status["message"].fillna("")
    n_failed = int((status["status"] == "failed").sum())
    if len(status) and n_failed == len(status):
        msg = (
            f"{out_prefix}: ALL {n_failed} clips of this shard failed to decode; "
            "the frame store is empty "
            f"(first error: {status['message'].iloc[0]})"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    elif n_failed:
        log.warning(
            "%s: %d of %d clips failed to decode (see %s)",
            out_prefix,
            n_failed,
            len(status),
            status_path(out_prefix),
        )
    tmp = Path(f"{status_path(out_prefix)}.tmp")
    status.to_csv(tmp, index=False)
    os.replace(tmp, status_path(out_prefix))
    return status


def read_status(prefix: str | os.PathLike) -> pd.DataFrame:
    """Load ``<prefix>.status.csv`` (message NaN → empty string)."""
    path = status_path(prefix)
    if not path.exists():
        raise FileNotFoundError(f"decode status not found: {path}")
    status = pd.read_csv(path, dtype={"clip_id": str, "status": str, "message": str})
    missing = [c for c in STATUS_COLUMNS if c not in status.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    status["message"] = status["message"].fillna("")
    return status
