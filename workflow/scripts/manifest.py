"""Snakemake adapter: build the clip manifest (mofo.data.manifest.build_manifest)."""

from mofo.data.manifest import build_manifest, write_manifest
from mofo.logs import job_log
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(snakemake.log[0]) as log:
    manifest = build_manifest(snakemake.config)
    write_manifest(manifest, snakemake.output[0])
    log.info("manifest: %d clips, %d shards", len(manifest), manifest["shard"].nunique())
