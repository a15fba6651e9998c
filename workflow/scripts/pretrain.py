"""Snakemake adapter: MOFO / VideoMAE pretraining (python -m mofo.training.pretrain)."""

from mofo.logs import job_log
from mofo.paths import METRICS_LOG, RECONSTRUCTIONS, results_root
from mofo.recipe.published import training_params
from mofo.stages import run_stage_module
from mofo.tracking import stage_run_from_snakemake
from mofo.training.restart import discard_if_forced

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]):
    tracker.log_params(training_params(sm.config, sm.rule, sm.params.nproc * sm.params.nodes))
    discard_if_forced(sm.rule, sm.output, sm.params.out_dir)  # forced: step 0; its retry resumes
    run_stage_module(
        "mofo.training.pretrain",
        ["--masking", sm.wildcards.masking, "--seed", sm.wildcards.seed, "--manifest", sm.input.manifest,
         "--results-dir", results_root(sm.config),
         "--out", sm.params.out_dir],
        sm.config,
        sm.params.out_dir,
        nproc=sm.params.nproc,
        nodes=sm.params.nodes,
        threads=sm.threads,
    )
    tracker.log_jsonl(f"{sm.params.out_dir}/{METRICS_LOG}")
    tracker.log_artifact(sm.output.checkpoint, "models")
    tracker.log_artifact(f"{sm.params.out_dir}/{RECONSTRUCTIONS}", "figures")
