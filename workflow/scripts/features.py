"""Snakemake adapter: pooled encoder features per clip (python -m mofo.evaluation.features)."""

from mofo.logs import job_log
from mofo.paths import results_root
from mofo.stages import run_stage_module
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]):
    run_stage_module(
        "mofo.evaluation.features",
        ["--checkpoint", sm.params.source, "--seed", sm.wildcards.seed, "--manifest", sm.input.manifest,
         "--results-dir", results_root(sm.config),
         "--out", sm.params.out_dir, "--splits", "train", "validation"],
        sm.config,
        sm.params.out_dir,
        threads=sm.threads,
    )
