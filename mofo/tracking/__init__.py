"""MLflow tracking across processes and SLURM jobs, by lifetime: ``tracker`` (what a run
logs: StageTracker), ``stage`` (one run per job), ``workflow`` (one parent run per invocation);
``settings`` and ``client`` below them.

Snakefile: ``start_workflow_run`` in ``onstart``, ``finish_workflow_run`` in ``onsuccess`` /
``onerror``. Stage scripts: ``with stage_run_from_snakemake(snakemake) as t`` (params: what the rule's stage reads,
``mofo.provenance.STAGE_READS``).
"""

from mofo.tracking.client import SafeClient, reset_process_state
from mofo.tracking.settings import (
    ENV_INVOCATION,
    ENV_PARENT_RUN,
    ENV_STAGE_RUN,
    TrackingSettings,
    config_hash,
    flatten,
    git_commit,
    resolve_settings,
)
from mofo.tracking.stage import attach_stage_run, stage_run, stage_run_from_snakemake
from mofo.tracking.tracker import StageTracker
from mofo.tracking.workflow import finish_workflow_run, start_workflow_run, workflow_record_path

__all__ = [
    "ENV_INVOCATION",
    "ENV_PARENT_RUN",
    "ENV_STAGE_RUN",
    "SafeClient",
    "StageTracker",
    "TrackingSettings",
    "attach_stage_run",
    "config_hash",
    "finish_workflow_run",
    "flatten",
    "git_commit",
    "reset_process_state",
    "resolve_settings",
    "stage_run",
    "stage_run_from_snakemake",
    "start_workflow_run",
    "workflow_record_path",
]
