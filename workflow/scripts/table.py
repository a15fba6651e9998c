"""Snakemake adapter: the variant table (mofo.evaluation.table.make_table)."""

from mofo.evaluation.table import make_table
from mofo.logs import job_log

sm = snakemake  # noqa: F821
with job_log(sm.log[0]) as log:
    labelled = {v["label"]: path for v, path in zip(sm.params.variants.values(), sm.input.metrics)}
    table = make_table(labelled, sm.output.csv, sm.output.md, sm.config["dataset"]["name"])
    log.info("\n%s", table.to_string(index=False))
