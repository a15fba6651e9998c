"""Snakemake adapter: generate the built-in demo dataset (mofo.data.demo.generate)."""

from mofo.data.demo import generate
from mofo.logs import job_log

with job_log(snakemake.log[0]) as log:  # noqa: F821 (snakemake is injected)
    clips = generate(snakemake.params.demo)  # noqa: F821
    log.info("generated %d demo clips", len(clips))
