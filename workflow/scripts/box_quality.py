"""Snakemake adapter: motion/box_quality.json (mofo.motion.quality.write_box_quality)."""

from mofo.logs import job_log
from mofo.motion.quality import write_box_quality
from mofo.paths import base_of
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    gt_boxes, clips = (sm.input.gt[0], sm.input.gt[1]) if sm.input.gt else (None, None)
    prefixes = [base_of(p, "frames_status") for p in sm.input.status]  # the frame stores
    result = write_box_quality(
        sm.output[0],
        sm.input.boxes,
        clips,
        gt_boxes,
        sm.config["model"],
        raw_flow_boxes=sm.input.raw_flow_boxes,
        frames_prefixes=prefixes,
        reports=sm.input.reports,
    )
    log.info("box quality: %s", {k: v for k, v in result.items() if not isinstance(v, dict)})
    tracker.log_summary(result)
    tracker.log_artifact(sm.output[0], "results")
