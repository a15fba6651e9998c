"""Snakemake adapter: decode one shard into the JPEG frame store (mofo.data.decode)."""

from mofo.data.decode import decode_shard
from mofo.data.manifest import read_manifest, select_shard
from mofo.logs import job_log
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    manifest = read_manifest(sm.input.manifest)
    rows = select_shard(manifest, sm.wildcards.shard)
    # The model's span is not this stage's business (the loader repeats frames of a clip
    # shorter than it and says so): `short` here means too few frames for flow.
    status = decode_shard(rows, sm.params.prefix, sm.config["decode"])
    log.info("decode %s: %s", sm.wildcards.shard, status["status"].value_counts().to_dict())
    tracker.log_metrics({f"clips_{k}": v for k, v in status["status"].value_counts().items()})
