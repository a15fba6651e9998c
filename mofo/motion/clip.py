"""The whole motion chain for ONE clip: decode -> flow -> motion map -> boxes -> picture.

The pipeline works per shard; this runs the same shard functions on a one-clip shard, so a
single clip can be rebuilt or inspected (after changing a threshold, say) without touching
its shard's outputs. Output folder: ``<results>/<dataset>/clips/<clip_id>/``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mofo.data.decode import decode_shard
from mofo.data.manifest import read_manifest
from mofo.motion.boundaries import motion_map_shard
from mofo.motion.boxes import boxes_shard
from mofo.motion.flow import flow_shard
from mofo.viz.motion import write_shard_pictures


def clip_row(manifest: pd.DataFrame, clip_id: str, source: str = "manifest") -> pd.DataFrame:
    rows = manifest[manifest["clip_id"].astype(str) == str(clip_id)]
    if rows.empty:
        raise KeyError(f"{source}: no clip with id {clip_id!r}")
    return rows


def process_clip(
    config: dict, manifest_path: str | Path, clip_id: str, out_dir: str | Path, gt_boxes_csv: str | Path | None = None
) -> dict:
    """Run decode, flow, motion map, boxes and the picture for one clip into ``out_dir``.

    Writes ``frames.*``, ``flow.npz``, ``motion_map.npz`` (+ ``.rawflow.npz``), ``boxes.csv``
    (+ ``.rawflow.csv``, ``.report.json``) and ``<clip_id>.png``; returns the box report
    with the decode status added.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = clip_row(read_manifest(manifest_path), clip_id, str(manifest_path))
    status = decode_shard(rows, out / "frames", config["decode"])
    if (status["status"] == "failed").all():
        raise RuntimeError(f"clip {clip_id}: decoding failed: {status['message'].iloc[0]}")
    flow_shard(out / "frames", out / "flow.npz", config["optical_flow"])
    motion_map_shard(out / "flow.npz", out / "motion_map.npz", config["motion_map"],
                     raw_flow_out=out / "motion_map.rawflow.npz", frames_prefix=out / "frames")
    report = boxes_shard(
        out / "motion_map.npz", out / "frames", out / "boxes.csv", config["motion_boxes"],
        raw_map_path=out / "motion_map.rawflow.npz",
    )
    write_shard_pictures(
        out / "frames", out / "motion_map.npz", out / "boxes.csv", out, n_clips=1,
        flow_path=out / "flow.npz", gt_boxes_csv=gt_boxes_csv, raw_boxes_csv=out / "boxes.rawflow.csv",
    )
    report["decode_status"] = status.iloc[0].to_dict()
    return report
