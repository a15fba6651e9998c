"""Snakemake adapter: the variant table (mofo.evaluation.table.make_table)."""

from mofo.evaluation.table import make_table
from mofo.logs import job_log
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    labelled = {v["label"]: path for v, path in zip(sm.params.variants.values(), sm.input.metrics)}
    table = make_table(labelled, sm.output.csv, sm.output.md, sm.config["dataset"]["name"])
    log.info("\n%s", table.to_string(index=False))
    tracker.log_artifact(sm.output.csv, "results")
    tracker.log_artifact(sm.output.md, "results")
