"""Snakemake adapter: build the clip manifest (mofo.data.manifest.build_manifest)."""

from mofo.data.manifest import build_manifest, write_manifest
from mofo.logs import job_log

with job_log(snakemake.log[0]) as log:  # noqa: F821
    manifest = build_manifest(snakemake.config)  # noqa: F821
    write_manifest(manifest, snakemake.output[0])  # noqa: F821
    log.info("manifest: %d clips, %d shards", len(manifest), manifest["shard"].nunique())
