"""Snakemake adapter: motion boxes for one shard (mofo.motion.boxes.boxes_shard)."""

from mofo.logs import job_log
from mofo.motion.boxes import boxes_shard
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    report = boxes_shard(
        sm.input.motion_map,
        sm.params.prefix,
        sm.output.boxes,
        sm.config["motion_boxes"],
        raw_map_path=sm.input.raw_flow_map,
    )
    log.info("boxes %s: %s", sm.wildcards.shard, report)
    tracker.log_summary(report)
