"""MLflow runs for the workflow: one parent per ``snakemake`` invocation, one child per job.

The Snakefile calls :func:`start_workflow_run` in ``onstart`` (main process only; Snakemake
runs no hooks inside jobs). It creates the parent run, puts its id into ``os.environ``
(:data:`ENV_PARENT_RUN`, inherited by every job, SLURM jobs included since they are submitted
with ``--export=ALL``) and records it in ``<results>/<dataset>/tracking/workflow_run.json``.
``onsuccess``/``onerror`` call :func:`finish_workflow_run`, which uploads the Snakemake log,
the benchmark files and this invocation's SLURM logs, adds each job's benchmark figures to its
child run and closes the parent.

Stage scripts wrap their work in :func:`stage_run` (or :func:`stage_run_from_snakemake`)::

    with stage_run(config, rule="decode", wildcards={"shard": "shard-0000"},
                   sections=("decode",), log_path=log) as tracker:
        tracker.log_metrics({"clips_ok": 31}, step=None)
        tracker.log_artifact("results/demo/motion/pictures/a.png", "figures")
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mofo.config import dataset_results_dir
from mofo.tracking.client import SafeClient
from mofo.tracking.settings import (
    ENV_INVOCATION,
    ENV_PARENT_RUN,
    ENV_STAGE_RUN,
    TrackingSettings,
    config_hash,
    flatten,
    git_commit,
    resolve_settings,
    run_name,
)

LOG = logging.getLogger("mofo.tracking")
PARENT_TAG = "mlflow.parentRunId"
#: Metrics are sent in batches: MLflow accepts at most 1000 metrics / 100 params per batch.
FLUSH_METRICS = 500
FLUSH_SECONDS = 10.0


def _now_ms() -> int:
    return int(time.time() * 1000)


def workflow_record_path(config: Mapping[str, Any]) -> Path:
    """``<results>/<dataset>/tracking/workflow_run.json``: the latest invocation's parent run."""
    return dataset_results_dir(dict(config)) / "tracking" / "workflow_run.json"


class StageTracker:
    """What a stage logs to its child run. Every method is a no-op when tracking is off."""

    def __init__(self, client: SafeClient | None, run_id: str | None):
        self.client = client
        self.run_id = run_id
        self._metrics: list[Any] = []
        self._last_flush = time.monotonic()

    @property
    def active(self) -> bool:
        return bool(self.client and self.run_id and self.client.active)

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Flatten ``params`` (nested dicts become dotted keys) and log them."""
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(dict(params), prefix).items()]
        for start in range(0, len(items), 100):
            self.client.call(
                lambda c, chunk: c.log_batch(self.run_id, params=chunk), items[start : start + 100]
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self.client.call(lambda c: c.log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Queue numeric metrics at ``step`` (0 when None); sent in batches.

        Values that are not numbers are skipped (named in the log); NaN/inf are sent as is.
        """
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = _now_ms()
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                LOG.info("tracking: metric %s=%r is not a number; not logged", key, value)
                continue
            self._metrics.append(Metric(str(key)[:250], number, ts, int(step or 0)))
        if (
            len(self._metrics) >= FLUSH_METRICS
            or time.monotonic() - self._last_flush > FLUSH_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        """Send the queued metrics now (also done on exit of :func:`stage_run`)."""
        queued, self._metrics = self._metrics, []
        self._last_flush = time.monotonic()
        if not queued or not self.active:
            return
        for start in range(0, len(queued), 1000):
            self.client.call(
                lambda c, chunk: c.log_batch(self.run_id, metrics=chunk),
                queued[start : start + 1000],
            )

    def log_record(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """One training-log record (``metrics.jsonl`` line) as metrics.

        ``type: step`` records keep their names (``loss``, ``lr``...) at the global step; other
        types are prefixed (``epoch_loss`` at the epoch number, ``end_...``). Bookkeeping keys
        (time, type, stage, step, epoch) and non-numbers are left out. Matches the engine's
        ``MetricsCallback`` signature, so ``metrics_callback=tracker.log_record`` logs live.
        """
        kind = str(record.get("type", "step"))
        if step is None:
            step = record.get("epoch" if kind == "epoch" else "step", 0)
        values = {}
        for key, value in record.items():
            if key in ("time", "type", "stage", "step", "epoch") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                values[key if kind == "step" else f"{kind}_{key}"] = value
        if values:
            self.log_metrics(values, step=int(step or 0))

    def log_summary(
        self, data: Mapping[str, Any] | str | Path, prefix: str = "", step: int | None = None
    ) -> None:
        """Numeric leaves of a (nested) dict or JSON file as metrics: ``{"iou": {"mean": .5}}``
        -> ``iou.mean``. For stage reports such as box_quality.json or eval metrics.json."""
        if not self.active:
            return
        if isinstance(data, (str, Path)):
            try:
                data = json.loads(Path(data).read_text())
            except (OSError, ValueError) as exc:
                LOG.info("tracking: cannot read %s as JSON (%s); not logged", data, exc)
                return
        values = {}
        for key, text in flatten(data, prefix).items():
            try:
                number = float(text)
            except ValueError:
                continue
            if text not in ("true", "false"):
                values[key] = number
        if values:
            self.log_metrics(values, step=step)

    def log_jsonl(self, path: str | Path) -> int:
        """Every record of a JSON-lines metrics file (see :meth:`log_record`); returns the count.

        For stages that run in a child process (torchrun): the script logs the file when the
        stage is done. Lines that are not JSON (cut by a kill) are skipped.
        """
        path = Path(path)
        if not self.active or not path.exists():
            return 0
        count = 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                self.log_record(record)
                count += 1
        self.flush()
        return count

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (recursively) under ``artifact_path``.

        Missing paths and files over ``max_artifact_mb`` are skipped with a log message: an
        artifact is a copy, the original stays where the pipeline wrote it.
        """
        if not self.active or not self.client.settings.log_artifacts:
            return
        path = Path(path)
        if not path.exists():
            LOG.info("tracking: artifact %s does not exist; not logged", path)
            return
        limit = self.client.settings.max_artifact_bytes
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if file.stat().st_size > limit:
                LOG.warning(
                    "tracking: %s is %.0f MB, over tracking.mlflow.max_artifact_mb; not uploaded",
                    file,
                    file.stat().st_size / 2**20,
                )
                continue
            sub = artifact_path
            if path.is_dir():
                rel_parent = file.parent.relative_to(path).as_posix()
                parts = [p for p in (artifact_path, path.name, rel_parent) if p and p != "."]
                sub = "/".join(parts)
            self.client.call(
                lambda c, local, dest: c.log_artifact(self.run_id, local, dest), str(file), sub
            )

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """A dict/list as a JSON or YAML artifact (format from the file name)."""
        if not self.active or not self.client.settings.log_artifacts:
            return
        self.client.call(lambda c: c.log_dict(self.run_id, data, artifact_file))


def _base_tags(config: Mapping[str, Any]) -> dict[str, str]:
    tags = {
        "mofo.git_commit": git_commit(),
        "mofo.config_hash": config_hash(config),
        "mofo.dataset": str((config.get("dataset") or {}).get("name", "")),
        "mofo.host": socket.gethostname(),
    }
    if os.environ.get(ENV_INVOCATION):
        tags["mofo.invocation_id"] = os.environ[ENV_INVOCATION]
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


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
    settings = resolve_settings(config)
    if not settings.enabled:
        yield StageTracker(None, None)
        return
    client = SafeClient(settings)
    wildcards = {str(k): str(v) for k, v in (wildcards or {}).items()}
    parent = parent_run_id or os.environ.get(ENV_PARENT_RUN) or None
    tags = {
        **_base_tags(config),
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
    from mofo.provenance import STAGE_READS, stage_settings

    wildcards = {k: v for k, v in sm.wildcards.items()} if hasattr(sm.wildcards, "items") else {}
    log = sm.log[0] if len(sm.log) else None
    settings = stage_settings(sm.config, sm.rule) if sm.rule in STAGE_READS else None
    return stage_run(sm.config, rule=sm.rule, wildcards=wildcards, sections=sections,
                     log_path=log, settings=settings)


def _never_raise(fn):
    """For the Snakefile hooks: an unexpected error in tracking is a warning, not a failure."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
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
        **_base_tags(config),
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
    bench_root = (
        Path(benchmark_dir) if benchmark_dir else dataset_results_dir(dict(config)) / "benchmarks"
    )
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
