"""The per-job lifecycle: one MLflow child run per Snakemake job (or stage process).

Stage scripts wrap their work in :func:`stage_run` (or :func:`stage_run_from_snakemake`)::

    with stage_run(config, rule="decode", wildcards={"shard": "shard-0000"},
                   sections=("decode",), log_path=log) as tracker:
        tracker.log_metrics({"clips_ok": 31}, step=None)
        tracker.log_artifact("results/demo/motion/pictures/a.png", "figures")

A process started by the stage (rank 0 under torchrun) logs to the same run with
:func:`attach_stage_run`. The parent run is mofo.tracking.workflow's.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mofo.tracking.client import SafeClient
from mofo.tracking.settings import ENV_PARENT_RUN, ENV_STAGE_RUN, resolve_settings, run_name
from mofo.tracking.tracker import PARENT_TAG, StageTracker, base_tags


def _status_for(exc: BaseException | None) -> str:
    """FINISHED; FAILED for an error; KILLED for an interrupt or a non-zero exit (preemption)."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    if isinstance(exc, SystemExit):
        return "FINISHED" if exc.code in (0, None) else "KILLED"
    return "FAILED"


@contextlib.contextmanager
def stage_run(
    config: Mapping[str, Any],
    rule: str,
    wildcards: Mapping[str, Any] | None = None,
    sections: Iterable[str] = (),
    log_path: str | Path | None = None,
    parent_run_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Iterator[StageTracker]:
    """A child run for one job of ``rule``; yields a :class:`StageTracker`.

    Tags: rule, wildcards, shard, git commit, config hash, dataset, host, SLURM job id,
    invocation id. Params: each config section in ``sections`` flattened (``decode.short_side``)
    and ``settings`` (``{dotted key: value}``, e.g. ``mofo.provenance.stage_settings``).
    On exit the queued metrics are sent, ``log_path`` is uploaded (also when the stage failed,
    which marks the run FAILED and re-raises) and the run is closed. The parent is
    ``parent_run_id`` or ``$MOFO_MLFLOW_PARENT_RUN_ID``; without either the run stands alone.
    """
    tracking = resolve_settings(config)  # not ``settings``: that is the stage's params
    if not tracking.enabled:
        yield StageTracker(None, None)
        return
    client = SafeClient(tracking)
    wildcards = {str(k): str(v) for k, v in (wildcards or {}).items()}
    parent = parent_run_id or os.environ.get(ENV_PARENT_RUN) or None
    tags = {
        **base_tags(config),
        "mofo.rule": rule,
        "mofo.wildcards": json.dumps(wildcards, sort_keys=True),
        "mofo.shard": wildcards.get("shard", ""),
    }
    if parent:
        tags[PARENT_TAG] = parent
    run_id = None
    experiment = client.experiment_id()
    if experiment is not None:
        run = client.call(
            lambda c: c.create_run(experiment, tags=tags, run_name=run_name(rule, wildcards))
        )
        run_id = run.info.run_id if run is not None else None
    tracker = StageTracker(client, run_id)
    for section in sections:
        if section in config:
            tracker.log_params({section: config[section]})
    if settings:
        tracker.log_params(dict(settings))
    error: BaseException | None = None
    previous = os.environ.get(ENV_STAGE_RUN)
    if run_id:
        os.environ[ENV_STAGE_RUN] = run_id
    try:
        yield tracker
    except BaseException as exc:
        error = exc
        raise
    finally:
        if previous is None:
            os.environ.pop(ENV_STAGE_RUN, None)
        else:
            os.environ[ENV_STAGE_RUN] = previous
        tracker.flush()
        if log_path is not None:
            tracker.log_artifact(log_path, "logs")
        if tracker.active:
            client.call(lambda c: c.set_terminated(run_id, _status_for(error)))


def attach_stage_run(config: Mapping[str, Any]) -> StageTracker:
    """A tracker on the stage run opened by a parent process (``$MOFO_MLFLOW_STAGE_RUN_ID``).

    For code running in a child process of a stage script, e.g. rank 0 of a torchrun job:
    ``run(..., metrics_callback=tracker.log_record)`` then ``tracker.flush()``. It neither
    creates nor closes the run; without the variable (or with tracking off) it does nothing.
    """
    settings = resolve_settings(config)
    run_id = os.environ.get(ENV_STAGE_RUN) or None
    if not settings.enabled or not run_id:
        return StageTracker(None, None)
    return StageTracker(SafeClient(settings), run_id)


def stage_run_from_snakemake(
    sm: Any, sections: Iterable[str] = ()
) -> contextlib.AbstractContextManager[StageTracker]:
    """:func:`stage_run` for a Snakemake ``script:`` (rule, wildcards, config and log from ``sm``).

    The params are what the rule's stage reads, as declared once in
    ``mofo.provenance.STAGE_READS``; ``sections`` is for rules outside that declaration."""
    from mofo.provenance import STAGE_READS, pretrain_stage, pretraining_spec, stage_settings

    wildcards = {k: v for k, v in sm.wildcards.items()} if hasattr(sm.wildcards, "items") else {}
    log = sm.log[0] if len(sm.log) else None
    stage, variant = sm.rule, None
    if stage == "pretrain" and "masking" in wildcards:  # a target's pretraining reads more
        variant, target = pretraining_spec(wildcards["masking"])
        stage = pretrain_stage(target)
    settings = stage_settings(sm.config, stage, variant) if stage in STAGE_READS else None
    return stage_run(sm.config, rule=sm.rule, wildcards=wildcards, sections=sections,
                     log_path=log, settings=settings)
