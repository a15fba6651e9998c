"""Where MLflow runs go and what identifies them: URI, experiment, config hash, git commit.

Pure helpers with no MLflow import, so they are cheap to call and easy to test.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mofo.config import REPO_ROOT

#: Set by :func:`mofo.tracking.start_workflow_run` in the Snakemake main process; every job
#: (local subprocess or SLURM job, which gets the submitting environment via --export=ALL)
#: inherits them and attaches its child run to that parent.
ENV_PARENT_RUN = "MOFO_MLFLOW_PARENT_RUN_ID"
ENV_INVOCATION = "MOFO_INVOCATION_ID"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
#: Set while a stage run is open, so a child process of the stage script (the training
#: module under torchrun) can log to the same run with :func:`mofo.tracking.attach_stage_run`.
ENV_STAGE_RUN = "MOFO_MLFLOW_STAGE_RUN_ID"

#: MLflow's limits: param values up to 6000 characters, keys up to 250.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250


@dataclass(frozen=True)
class TrackingSettings:
    """The resolved ``tracking.mlflow`` section."""

    enabled: bool
    uri: str
    experiment: str
    artifact_location: str | None  # only for the embedded local store
    log_artifacts: bool
    max_artifact_bytes: int
    request_timeout: float
    request_retries: int

    @property
    def is_http(self) -> bool:
        return self.uri.startswith(("http://", "https://"))


def local_store_uri(results_dir: str | Path) -> str:
    """``sqlite:///<abs results_dir>/mlflow.db``: safe for several processes on one machine."""
    return "sqlite:///" + str((Path(results_dir) / "mlflow.db").resolve())


def resolve_settings(
    config: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> TrackingSettings:
    """Read ``config["tracking"]["mlflow"]``; ``$MLFLOW_TRACKING_URI`` wins over the config.

    The environment wins so that one command line (``MLFLOW_TRACKING_URI=http://... snakemake``)
    can point any configuration at a server; an empty URI everywhere means the local store
    ``<results_dir>/mlflow.db`` with artifacts in ``<results_dir>/mlflow-artifacts``.
    """
    env = os.environ if env is None else env
    section = config["tracking"]["mlflow"]  # validated: config/config.yaml has every key
    uri = env.get(ENV_TRACKING_URI, "").strip() or str(section["tracking_uri"]).strip()
    artifact_location = None
    if not uri:
        results = Path(config["results_dir"])
        uri = local_store_uri(results)
        artifact_location = (results / "mlflow-artifacts").resolve().as_uri()
    return TrackingSettings(
        enabled=bool(section["enabled"]),
        uri=uri,
        experiment=str(section["experiment"]),
        artifact_location=artifact_location,
        log_artifacts=bool(section["log_artifacts"]),
        max_artifact_bytes=int(float(section["max_artifact_mb"]) * 1024 * 1024),
        request_timeout=float(section["request_timeout"]),
        request_retries=int(section["request_retries"]),
    )


def flatten(section: Any, prefix: str = "") -> dict[str, str]:
    """``{"tvl1": {"tau": 0.25}}`` -> ``{"tvl1.tau": "0.25"}`` with MLflow's length limits.

    Lists stay one value (``[1.0, 0.875]``) so a crop-scale list is one param, not four.
    """
    out: dict[str, str] = {}
    if isinstance(section, Mapping):
        if not section and prefix:
            out[prefix[:MAX_KEY]] = "{}"
        for key, value in section.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(flatten(value, name))
    else:
        text = (
            json.dumps(section)
            if isinstance(section, (list, tuple, bool)) or section is None
            else str(section)
        )
        out[(prefix or "value")[:MAX_KEY]] = text[:MAX_PARAM_VALUE]
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits that change whenever any setting changes (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def git_commit(repo: str | Path = REPO_ROOT) -> str:
    """The checked-out commit (``+dirty`` when tracked files changed), or ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_name(rule: str, wildcards: Mapping[str, Any] | None) -> str:
    """``decode-shard-0000``: the rule plus its wildcard values, as shown in the MLflow UI."""
    values = [str(v) for v in (wildcards or {}).values()]
    return "-".join([rule, *values])
