"""Snakemake adapter: MME's point trajectories for one shard (mofo.motion.trajectories)."""

from mofo.logs import job_log
from mofo.motion.trajectories import trajectories_shard
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    report = trajectories_shard(sm.params.prefix, sm.output.trajectories, sm.params.settings,
                                sm.params.flow)
    log.info("trajectories %s: %s", sm.wildcards.shard, report)
    tracker.log_summary(report)
