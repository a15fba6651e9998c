"""Snakemake adapter: decode one shard into the JPEG frame store (mofo.data.decode)."""

from mofo.data.decode import decode_shard
from mofo.data.manifest import read_manifest
from mofo.logs import job_log

sm = snakemake  # noqa: F821
with job_log(sm.log[0]) as log:
    manifest = read_manifest(sm.input.manifest)
    shard = int(sm.wildcards.shard.removeprefix("shard-"))
    rows = manifest[manifest["shard"] == shard]
    status = decode_shard(rows, sm.params.prefix, sm.config["decode"], min_frames=sm.config["model"]["num_frames"])
    log.info("decode %s: %s", sm.wildcards.shard, status["status"].value_counts().to_dict())
