"""Snakemake adapter: the variant table over seeds (mofo.evaluation.table.make_table)."""

from mofo.evaluation.table import Run, make_table
from mofo.logs import job_log
from mofo.recipe.published import recipe_label
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    runs = [Run(**run) for run in sm.params.runs]
    table = make_table(runs, sm.output.csv, sm.output.seeds, sm.output.md,
                       sm.config["dataset"]["name"], recipe=recipe_label(sm.config))
    log.info("\n%s", table.to_string(index=False))
    for path in (sm.output.csv, sm.output.seeds, sm.output.md):
        tracker.log_artifact(path, "results")
