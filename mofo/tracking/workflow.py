"""The workflow parent run: one per ``snakemake`` invocation, alive from ``onstart`` to
``onsuccess`` / ``onerror``.

The Snakefile calls :func:`start_workflow_run` in ``onstart`` (main process only; Snakemake
runs no hooks inside jobs). It creates the parent run, puts its id into ``os.environ``
(:data:`ENV_PARENT_RUN`, inherited by every job, SLURM jobs included since they are submitted
with ``--export=ALL``) and records it in ``<results>/<dataset>/tracking/workflow_run.json``.
``onsuccess``/``onerror`` call :func:`finish_workflow_run`, which uploads the Snakemake log,
the benchmark files and this invocation's SLURM logs, adds each job's benchmark figures to its
child run (mofo.tracking.stage) and closes the parent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mofo.paths import pattern, results_root
from mofo.tracking.client import SafeClient
from mofo.tracking.settings import (
    ENV_INVOCATION,
    ENV_PARENT_RUN,
    TrackingSettings,
    resolve_settings,
)
from mofo.tracking.tracker import LOG, PARENT_TAG, StageTracker, base_tags


def workflow_record_path(config: Mapping[str, Any]) -> Path:
    """``<results>/<dataset>/tracking/workflow_run.json``: the latest invocation's parent run."""
    return Path(pattern("workflow_run", results_root(config)))


def _never_raise(fn):
    """For the Snakefile hooks: an unexpected error in tracking is a warning, not a failure."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            LOG.warning(
                "tracking: %s failed (%s: %s); the workflow goes on",
                fn.__name__,
                type(exc).__name__,
                exc,
            )
            return None

    return wrapper


@_never_raise
def start_workflow_run(config: Mapping[str, Any], invocation_id: str | None = None) -> str | None:
    """Create this invocation's parent run and export its id to every job; return the id.

    Call once per ``snakemake`` invocation, in the main process (the Snakefile's ``onstart``).
    Also writes ``<results>/<dataset>/tracking/workflow_run.json``. Returns None when tracking
    is off or the store is unreachable (the jobs then still try on their own, warning once).
    """
    settings = resolve_settings(config)
    invocation_id = invocation_id or uuid.uuid4().hex[:12]
    os.environ[ENV_INVOCATION] = invocation_id
    os.environ.pop(ENV_PARENT_RUN, None)
    if not settings.enabled:
        return None
    client = SafeClient(settings)
    experiment = client.experiment_id()
    if experiment is None:
        return None
    tags = {
        **base_tags(config),
        "mofo.workflow": "true",
        "mofo.command": " ".join(sys.argv)[:5000],
    }
    run = client.call(
        lambda c: c.create_run(experiment, tags=tags, run_name=f"workflow-{invocation_id}")
    )
    if run is None:
        return None
    run_id = run.info.run_id
    tracker = StageTracker(client, run_id)
    tracker.log_dict(dict(config), "config.yaml")
    os.environ[ENV_PARENT_RUN] = run_id
    record = {
        "run_id": run_id,
        "invocation_id": invocation_id,
        "experiment_id": experiment,
        "tracking_uri": settings.uri,
        "start_time_ms": run.info.start_time,
        "status": "RUNNING",
    }
    _write_record(config, record)
    return run_id


def _write_record(config: Mapping[str, Any], record: dict) -> None:
    path = workflow_record_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(path)
    except OSError as exc:
        LOG.warning("tracking: cannot write %s: %s", path, exc)


def _read_benchmark(path: Path) -> dict[str, float]:
    """The first row of a Snakemake benchmark TSV as numbers (``s``, ``max_rss``, ...)."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        return {}
    out = {}
    for key, value in zip(lines[0].split("\t"), lines[1].split("\t")):
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def _children(client: SafeClient, experiment: str, parent: str) -> list[Any]:
    runs = client.call(
        lambda c: c.search_runs(
            [experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'", max_results=5000
        )
    )
    return list(runs or [])


@_never_raise
def finish_workflow_run(
    config: Mapping[str, Any],
    status: str = "FINISHED",
    log: str | Path | Iterable[str | Path] | None = None,
    benchmark_dir: str | Path | None = None,
    slurm_log_dir: str | Path = ".snakemake/slurm_logs",
) -> None:
    """Close the parent run (``onsuccess``: FINISHED, ``onerror``: FAILED) after uploading
    the Snakemake log, the benchmark files (``<results>/<dataset>/benchmarks`` by default; each
    child run also gets its job's benchmark figures as ``benchmark.<column>`` metrics) and the
    SLURM job logs written since the invocation started.
    """
    run_id = os.environ.get(ENV_PARENT_RUN)
    settings: TrackingSettings = resolve_settings(config)
    if not run_id or not settings.enabled:
        return
    client = SafeClient(settings)
    tracker = StageTracker(client, run_id)
    # Snakemake 9 hands the hooks a list of log files (older versions one path).
    logs = [log] if isinstance(log, (str, Path)) else list(log or [])
    for path in logs:
        tracker.log_artifact(path, "logs")
    bench_root = Path(benchmark_dir or pattern("benchmarks", results_root(config)))
    start_ms = 0
    record_path = workflow_record_path(config)
    record: dict = {}
    if record_path.exists():
        with contextlib.suppress(ValueError, OSError):
            record = json.loads(record_path.read_text())
            start_ms = int(record.get("start_time_ms") or 0)
    if bench_root.is_dir():
        tracker.log_artifact(bench_root, None)
        _benchmarks_to_children(client, record.get("experiment_id"), run_id, bench_root)
    slurm_logs = Path(slurm_log_dir)
    if slurm_logs.is_dir():
        for file in sorted(slurm_logs.rglob("*.log")):
            if file.stat().st_mtime * 1000 >= start_ms:
                rel = file.parent.relative_to(slurm_logs).as_posix()
                tracker.log_artifact(file, "slurm_logs/" + rel if rel != "." else "slurm_logs")
    client.call(lambda c: c.set_terminated(run_id, status))
    if record.get("run_id") == run_id:
        record["status"] = status
        _write_record(config, record)


def _benchmarks_to_children(
    client: SafeClient, experiment: str | None, parent: str, root: Path
) -> None:
    """``benchmarks/<rule>/<wildcard values>.tsv`` -> metrics ``benchmark.s`` etc. of the child
    run with that rule and run name. Files with no matching child of this parent are skipped."""
    if not experiment:
        return
    by_name = {}
    for run in _children(client, experiment, parent):
        by_name[run.info.run_name] = run.info.run_id
    tracker = StageTracker(client, None)
    for tsv in sorted(root.rglob("*.tsv")):
        rel = tsv.relative_to(root).with_suffix("")
        name = "-".join(rel.parts)  # benchmarks/decode/shard-0000.tsv -> decode-shard-0000
        child = by_name.get(name)
        if child is None:
            continue
        tracker.run_id = child
        tracker.log_metrics({f"benchmark.{k}": v for k, v in _read_benchmark(tsv).items()})
        tracker.flush()
