"""Shared fixtures: a real local SLURM cluster and a real MLflow server (integration tests).

Both are session-scoped (started once, in a temp dir, stopped at the end). A test that asks
for one is skipped, with the reason, only where it cannot exist: the SLURM cluster needs root
and slurm-wlm + munge (installed by tests/cluster/install_slurm.sh when missing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import pipeline
from tests.cluster.mlflow_server import MlflowServer, mlflow_server
from tests.cluster.slurm import LocalSlurm, local_slurm, unavailable_reason


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> LocalSlurm:
    """A one-node SLURM (2 fake GPUs) on localhost; SLURM_CONF is in ``cluster.env()``."""
    reason = unavailable_reason(install=True)
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    with local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mlflow_tracking_server(tmp_path_factory) -> MlflowServer:
    """``mlflow server`` on 127.0.0.1:<free port>, SQLite backend, proxied artifacts."""
    pytest.importorskip("mlflow")
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_local_pipeline(mlflow_tracking_server, tmp_path_factory) -> Path:
    """The real pipeline on .test/config/tiny.yaml with the local executor (2 cores), tracked
    to the test server. Shared: the ``mlflow`` tests check its runs, the ``slurm`` tests
    compare the SLURM run's results with it. Returns the working directory."""
    work = pipeline.workdir(tmp_path_factory.mktemp("tiny-local") / "work")
    proc = pipeline.run_local(work, extra_env={"MLFLOW_TRACKING_URI": mlflow_tracking_server.uri})
    assert proc.returncode == 0, f"local pipeline run failed:\n{proc.stderr[-6000:]}"
    return work
