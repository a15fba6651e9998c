"""Snakemake adapter: generate the built-in demo dataset (mofo.data.demo.generate)."""

from mofo.data.demo import generate
from mofo.logs import job_log
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(snakemake.log[0]) as log:
    clips = generate(snakemake.params.demo)
    log.info("generated %d demo clips", len(clips))
