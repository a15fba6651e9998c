"""MLflow tracking across processes and SLURM jobs (see mofo/tracking/runs.py).

Snakefile: ``start_workflow_run`` in ``onstart``, ``finish_workflow_run`` in ``onsuccess`` /
``onerror``. Stage scripts: ``with stage_run_from_snakemake(snakemake) as t`` (params: what the rule's stage reads,
``mofo.provenance.STAGE_READS``).
"""

from mofo.tracking.client import SafeClient, reset_process_state
from mofo.tracking.runs import (
    StageTracker,
    attach_stage_run,
    finish_workflow_run,
    stage_run,
    stage_run_from_snakemake,
    start_workflow_run,
    workflow_record_path,
)
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
