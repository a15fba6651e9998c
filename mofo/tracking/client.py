"""An MLflow client that can never break the pipeline.

Every call goes through :meth:`SafeClient.call`: the first failure (server down, HTTP error,
locked database...) logs ONE warning for the whole process, naming the URI and the error, and
turns tracking off for the rest of the process, so a dead server costs one short timeout, not
one per metric. Outputs are written by the stages regardless; only the tracking is lost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mofo.tracking.settings import TrackingSettings

LOG = logging.getLogger("mofo.tracking")
T = TypeVar("T")

# Per process: URIs found unusable (uri -> reason) and whether the warning was given.
_DISABLED: dict[str, str] = {}
_WARNED = False


def reset_process_state() -> None:
    """Forget earlier failures (tests; a long-lived process that wants to retry)."""
    global _WARNED
    _DISABLED.clear()
    _WARNED = False


def warn_once(uri: str, reason: str) -> None:
    """Log the tracking-is-off warning the first time only, and remember the URI as down."""
    global _WARNED
    _DISABLED.setdefault(uri, reason)
    if not _WARNED:
        _WARNED = True
        LOG.warning(
            "MLflow tracking at %s is off for this process: %s. The pipeline goes on "
            "and writes its outputs; only the tracking of this job is lost.",
            uri,
            reason,
        )


def apply_http_defaults(settings: TrackingSettings) -> None:
    """Short HTTP timeouts/retries unless the user set MLflow's own environment variables."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, settings.request_timeout))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.request_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def probe(settings: TrackingSettings) -> str | None:
    """Why the store is unusable right now (None if it looks fine). Fast: one short request.

    For a server, ``GET /health`` with a timeout of at most 5 s (a refused port answers at
    once). For the local SQLite store, its folder must be creatable.
    """
    if settings.is_http:
        import requests

        url = settings.uri.rstrip("/") + "/health"
        try:
            requests.get(url, timeout=min(5.0, settings.request_timeout))
        except requests.RequestException as exc:
            return f"cannot reach {url} ({type(exc).__name__}: {exc})"
        # Any HTTP answer means something listens; real API errors are caught per call.
        return None
    if settings.uri.startswith("sqlite:///"):
        path = Path(settings.uri[len("sqlite:///") :])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create {path.parent}: {exc}"
    return None


class SafeClient:
    """Lazily created ``MlflowClient`` for one URI whose calls never raise."""

    def __init__(self, settings: TrackingSettings):
        self.settings = settings
        self._client: Any = None

    @property
    def uri(self) -> str:
        return self.settings.uri

    @property
    def active(self) -> bool:
        return self.settings.enabled and self.uri not in _DISABLED

    def _get(self) -> Any:
        if self._client is None:
            reason = probe(self.settings)
            if reason:
                raise ConnectionError(reason)
            apply_http_defaults(self.settings)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(client, *args, **kwargs)``; None (and tracking off) on any error."""
        if not self.active:
            return None
        try:
            return fn(self._get(), *args, **kwargs)
        except Exception as exc:  # tracking must never stop the pipeline
            warn_once(
                self.uri, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            return None

    def experiment_id(self) -> str | None:
        """The configured experiment's id, created on first use (safe against a race)."""

        def get_or_create(client: Any) -> str:
            exp = client.get_experiment_by_name(self.settings.experiment)
            if exp is not None:
                return exp.experiment_id
            try:
                return client.create_experiment(
                    self.settings.experiment, artifact_location=self.settings.artifact_location
                )
            except Exception:
                # Another job created it between the two calls.
                exp = client.get_experiment_by_name(self.settings.experiment)
                if exp is None:
                    raise
                return exp.experiment_id

        return self.call(get_or_create)
