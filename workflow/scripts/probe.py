"""Snakemake adapter: kNN, linear and attentive probe of one encoder's features
(mofo.evaluation.probe); the attentive probe's seed is the {seed} wildcard."""

import json

from mofo.evaluation.probe import run_probe
from mofo.logs import job_log
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
with stage_run_from_snakemake(sm) as tracker, job_log(sm.log[0]) as log:
    metrics = run_probe(sm.input.train, sm.input.validation, sm.params.probe, sm.output.metrics,
                        int(sm.wildcards.seed))
    log.info("%s", json.dumps(metrics))
    tracker.log_summary(sm.output.metrics)
    tracker.log_artifact(sm.output.metrics, "results")
