"""Snakemake adapter: frame | flow | motion map | boxes pictures for a few clips of one shard."""

from pathlib import Path

from mofo.logs import job_log
from mofo.tracking import stage_run_from_snakemake
from mofo.viz.motion import write_shard_pictures

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    Path(sm.output[0]).mkdir(parents=True, exist_ok=True)
    written = write_shard_pictures(
        sm.params.prefix,
        sm.input.motion_map,
        sm.input.boxes,
        sm.output[0],
        n_clips=sm.config["pictures"]["clips_per_shard"],
        flow_path=sm.input.picture_flow,
        gt_boxes_csv=sm.input.gt[0] if sm.input.gt else None,
        raw_boxes_csv=sm.input.raw_flow_boxes,
    )
    log.info("wrote %d pictures to %s", len(written), sm.output[0])
    tracker.log_artifact(sm.output[0], "figures")
