"""Snakemake adapter: fine-tuning with a mean or MCA head (python -m mofo.training.finetune)."""

from mofo.logs import job_log
from mofo.paths import METRICS_LOG, results_root
from mofo.provenance import finetuning_spec
from mofo.recipe.published import training_params
from mofo.stages import run_stage_module
from mofo.tracking import stage_run_from_snakemake
from mofo.training.restart import discard_if_forced

sm = snakemake
head, label_fraction = finetuning_spec(sm.wildcards.head)  # mean_l10: 10 % of the labels
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]):
    tracker.log_params(training_params(sm.config, sm.rule, sm.params.nproc * sm.params.nodes))
    discard_if_forced(sm.rule, sm.output, sm.params.out_dir)  # forced: step 0; its retry resumes
    run_stage_module(
        "mofo.training.finetune",
        ["--head", head, "--seed", sm.wildcards.seed, "--manifest", sm.input.manifest,
         *(["--label-fraction", str(label_fraction)] if label_fraction else []),
         *(["--pretrained", sm.input.pretrained] if sm.input.pretrained else []),  # scratch: none
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
