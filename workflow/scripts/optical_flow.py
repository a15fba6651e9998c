"""Snakemake adapter: optical flow for one shard (mofo.motion.flow.flow_shard)."""

from mofo.logs import job_log
from mofo.motion.flow import flow_shard
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]):
    flow_shard(sm.params.prefix, sm.output.flow, sm.config["optical_flow"],
               picture_out=sm.output.picture_flow,
               n_picture_clips=sm.config["pictures"]["clips_per_shard"],
               pooled_out=sm.output.pooled_flow)
