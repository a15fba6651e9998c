"""Snakemake adapter: pooled encoder features per clip (python -m mofo.evaluation.features)."""

from mofo.logs import job_log
from mofo.stages import run_stage_module
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]):
    run_stage_module(
        "mofo.evaluation.features",
        ["--checkpoint", sm.params.source, "--seed", sm.wildcards.seed, "--manifest", sm.input.manifest,
         "--results-dir", sm.config["results_dir"] + "/" + sm.config["dataset"]["name"],
         "--out", sm.params.out_dir, "--splits", "train", "validation"],
        sm.config,
        sm.params.out_dir,
        threads=sm.threads,
    )
