"""Snakemake adapter: multi-view evaluation of one variant (python -m mofo.evaluation.evaluate)."""

from mofo.logs import job_log
from mofo.paths import results_root
from mofo.provenance import finetuning_spec
from mofo.stages import run_stage_module
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]):
    run_stage_module(
        "mofo.evaluation.evaluate",
        ["--head", finetuning_spec(sm.wildcards.head)[0], "--checkpoint", sm.input.checkpoint, "--manifest", sm.input.manifest,
         "--results-dir", results_root(sm.config),
         "--out", sm.params.out_dir],
        sm.config,
        sm.params.out_dir,
        threads=sm.threads,
    )
    tracker.log_summary(sm.output.metrics)
    tracker.log_artifact(sm.output.metrics, "results")
    tracker.log_artifact(sm.output.predictions, "results")
