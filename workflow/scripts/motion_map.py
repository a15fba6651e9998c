"""Snakemake adapter: motion boundaries (and the raw-flow baseline maps) for one shard."""

from mofo.logs import job_log
from mofo.motion.boundaries import motion_map_shard
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]):
    motion_map_shard(
        sm.input.flow, sm.output.motion_map, sm.config["motion_map"],
        raw_flow_out=sm.output.raw_flow_map, frames_prefix=sm.params.prefix,
    )
