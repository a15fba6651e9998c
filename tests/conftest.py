"""Shared fixtures: a real local SLURM cluster and a real MLflow server (integration tests).

Both are session-scoped (started once, in a temp dir, stopped at the end). A test that asks
for one is skipped, with the reason, only where it cannot exist: the SLURM cluster needs root
and slurm-wlm + munge (installed by tests/cluster/install_slurm.sh when missing).

Test hygiene (issue 16):

- With ``CI=true`` in the environment a skipped ``slurm`` or ``mlflow`` test is reported as a
  failure: on CI a missing cluster or server is a broken install, not a reason for green.
- ``--reverse-order`` runs the collected tests last to first, to show they do not depend on
  the file order.
- Every test runs with the ``MOFO_*`` / ``MLFLOW_*`` environment variables it started with
  restored afterwards (``start_workflow_run`` sets the parent run id in ``os.environ``).
"""

from __future__ import annotations

import os
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
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_local_pipeline(mlflow_tracking_server, tmp_path_factory) -> Path:
    """The real pipeline on .test/config/tiny.yaml with the local executor (2 cores), tracked
    to the test server. Built once per session and shared read-only: the ``mlflow`` tests
    check its runs, the ``slurm`` tests compare the SLURM run's results with it; the report
    and resume tests run Snakemake on a private copy of it
    (``tests.cluster.pipeline.private_copy``). Returns the working directory."""
    work = pipeline.workdir(tmp_path_factory.mktemp("tiny-local") / "work")
    proc = pipeline.run_local(work, extra_env={"MLFLOW_TRACKING_URI": mlflow_tracking_server.uri})
    assert proc.returncode == 0, f"local pipeline run failed:\n{proc.stderr[-6000:]}"
    return work


# --------------------------------------------------------------------------- test hygiene
#: Markers whose tests must not be skipped on CI (CI=true): a skip there hides a broken install.
CI_REQUIRED_MARKERS = ("slurm", "mlflow", "browser")
#: Environment variables a test may change that later tests read (tracking, parent run...).
ENV_PREFIXES = ("MOFO_", "MLFLOW_")


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_addoption(parser):
    parser.addoption(
        "--reverse-order",
        action="store_true",
        default=False,
        help="run the collected tests in reverse order (checks there is no order dependence)",
    )


#: Under pytest-xdist (``make test``, the Makefile's flags) a test runs in one of these units of
#: work, handed out in this order: the tests on the local SLURM cluster (it exists once per
#: machine: it owns /etc/slurm/slurm.conf), mostly waiting for SLURM beside the other worker's
#: CPU work; then the other users of the session's tiny pipeline, on the other worker (it builds
#: its own copy there: one build per worker); then each remaining file as one unit, so its
#: module fixtures are built once.
XDIST_UNITS = (("slurm", "slurm_cluster"), ("tiny-pipeline", "tiny_local_pipeline"))


def xdist_unit(item) -> tuple[int, str]:
    """(hand-out rank, group name) of a test under xdist: see ``XDIST_UNITS``."""
    fixtures = getattr(item, "fixturenames", ())
    for rank, (group, fixture) in enumerate(XDIST_UNITS):
        if fixture in fixtures:
            return rank, group
    return len(XDIST_UNITS), item.path.name


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: two of them share the 2 cores
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()
    if not hasattr(config, "workerinput"):  # not an xdist worker: the order stays
        return
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_unit(item)[1]))
    items.sort(key=lambda item: xdist_unit(item)[0])  # stable: file order kept within a rank


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and on_ci() and not hasattr(report, "wasxfail")):
        return
    marks = [m for m in CI_REQUIRED_MARKERS if item.get_closest_marker(m)]
    if marks:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"skipped on CI (CI=true), which counts as a failure for {'/'.join(marks)} tests: "
            f"{reason}"
        )


def tracked_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


@pytest.fixture(autouse=True)
def restore_tracking_env():
    """Put the MOFO_* / MLFLOW_* variables back as they were before the test (set, changed or
    removed by it), so that no parent run id or server URI leaks into later tests."""
    before = tracked_env()
    yield
    for key in tracked_env().keys() - before.keys():
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, OpenMP spinning makes 2 threads far slower.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
