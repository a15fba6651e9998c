"""The tracker API: what a stage logs to its MLflow run (:class:`StageTracker`), and the tags
every run of the workflow carries. Lives as long as one run; opening and closing runs is
mofo.tracking.stage (one per job) and mofo.tracking.workflow (the invocation's parent run).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mofo.tracking.client import SafeClient
from mofo.tracking.settings import ENV_INVOCATION, config_hash, flatten, git_commit

LOG = logging.getLogger("mofo.tracking")
PARENT_TAG = "mlflow.parentRunId"
#: Metrics are sent in batches: MLflow accepts at most 1000 metrics / 100 params per batch.
FLUSH_METRICS = 500
FLUSH_SECONDS = 10.0


def _now_ms() -> int:
    return int(time.time() * 1000)


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
        types are prefixed (``epoch_loss`` at the epoch number, ``end_...``) unless the name
        already carries the prefix (``val_loss`` of a ``val`` record). Bookkeeping keys
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
                plain = kind == "step" or key.startswith(f"{kind}_")
                values[key if plain else f"{kind}_{key}"] = value
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


def base_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """The tags of every run, stage or workflow: commit, config hash, dataset, host, ids."""
    tags = {
        "mofo.git_commit": git_commit(),
        "mofo.config_hash": config_hash(config),
        "mofo.dataset": str(config["dataset"]["name"]),
        "mofo.host": socket.gethostname(),
    }
    if os.environ.get(ENV_INVOCATION):
        tags["mofo.invocation_id"] = os.environ[ENV_INVOCATION]
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags
