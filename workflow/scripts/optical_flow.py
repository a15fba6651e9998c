"""Snakemake adapter: optical flow for one shard (mofo.motion.flow.flow_shard)."""

from mofo.logs import job_log
from mofo.motion.flow import flow_shard

sm = snakemake  # noqa: F821
with job_log(sm.log[0]):
    flow_shard(sm.params.prefix, sm.output.flow, sm.config["optical_flow"])
