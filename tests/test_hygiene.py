"""The test suite's own guarantees (tests/conftest.py, issue 16), checked with pytester.

Each test runs a small inner pytest session whose conftest takes the hooks and the autouse
fixture from tests/conftest.py, so a change that breaks one of them fails here.
"""

from __future__ import annotations

from pathlib import Path

# pytester's in-process runs remove from sys.modules what was first imported inside them, and
# numpy (a C extension) cannot be imported a second time in one process: a later test that
# imports it (through torch) failed with "cannot load module more than once per process" when
# this file ran first. Imported here, numpy is in the snapshot the inner runs restore.
import numpy  # noqa: F401
import pytest

CONFTEST = """
from tests.conftest import (
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_runtest_makereport,
    restore_tracking_env,
)
"""

SKIPPING = """
import pytest

@pytest.fixture
def cluster():
    pytest.skip("no local SLURM: apt-get failed")

@pytest.mark.slurm
def test_needs_slurm(cluster):
    pass

@pytest.mark.mlflow
def test_needs_mlflow():
    pytest.skip("no server")

def test_plain_skip():
    pytest.skip("optional feature")

@pytest.mark.slurm
@pytest.mark.xfail(reason="known")
def test_xfail_is_not_a_skip():
    assert False
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(CONFTEST)
    # -p no:randomly: pytest-randomly (a dev extra) would load itself into the inner run too
    # and shuffle it; the inner order must be the collected one, as in the outer suite.
    pytester.makeini("[pytest]\naddopts = -p no:randomly\nmarkers =\n    slurm: x\n"
                     "    mlflow: x\n")
    return pytester


def test_skipped_slurm_and_mlflow_tests_fail_on_ci(inner, monkeypatch):
    inner.makepyfile(test_skips=SKIPPING)
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest("-rA")
    # the fixture skip is turned into a setup error, the in-test skip into a failure
    result.assert_outcomes(errors=1, failed=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped on CI (CI=true)*apt-get failed*"])


def test_skips_stay_skips_off_ci(inner, monkeypatch):
    inner.makepyfile(test_skips=SKIPPING)
    monkeypatch.delenv("CI", raising=False)
    inner.runpytest().assert_outcomes(skipped=3, xfailed=1)
    monkeypatch.setenv("CI", "false")
    inner.runpytest().assert_outcomes(skipped=3, xfailed=1)


def test_reverse_order_option(inner):
    inner.makepyfile(
        test_a="def test_1(): pass\ndef test_2(): pass\n",
        test_b="def test_3(): pass\n",
    )
    forward = inner.runpytest("-v")
    forward.stdout.fnmatch_lines(["*test_1 PASSED*", "*test_2 PASSED*", "*test_3 PASSED*"])
    backward = inner.runpytest("-v", "--reverse-order")
    backward.stdout.fnmatch_lines(["*test_3 PASSED*", "*test_2 PASSED*", "*test_1 PASSED*"])


def test_tracking_variables_do_not_leak_into_later_tests(inner, monkeypatch):
    """What start_workflow_run does (parent run id into os.environ) is undone after the test;
    variables that were set before keep their value, removed ones come back."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://outer")
    monkeypatch.delenv("MOFO_MLFLOW_PARENT_RUN_ID", raising=False)
    inner.makepyfile(
        test_env="""
import os

def test_1_sets():
    os.environ["MOFO_MLFLOW_PARENT_RUN_ID"] = "leaked"
    os.environ["MLFLOW_TRACKING_URI"] = "http://changed"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

def test_2_removes():
    del os.environ["MLFLOW_TRACKING_URI"]

def test_3_sees_nothing():
    assert "MOFO_MLFLOW_PARENT_RUN_ID" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://outer"
"""
    )
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    inner.runpytest().assert_outcomes(passed=3)


def test_start_workflow_run_leaves_no_parent_run_behind(inner, monkeypatch, tmp_path):
    """The real case: start_workflow_run (and MLflow's client settings) write the parent run
    id, the invocation id and MLFLOW_HTTP_* into os.environ; the next test sees none of it."""
    for var in ("MOFO_MLFLOW_PARENT_RUN_ID", "MOFO_INVOCATION_ID", "MLFLOW_TRACKING_URI",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    inner.makepyfile(
        test_env=f"""
import os
from mofo.config import load_config
from mofo.tracking import ENV_INVOCATION, ENV_PARENT_RUN, finish_workflow_run, start_workflow_run

def config():
    mlflow = {{"experiment": "hygiene"}}
    return load_config(overrides={{"results_dir": {str(tmp_path)!r}, "tracking": {{"mlflow": mlflow}}}})

def test_1_starts_a_workflow_run():
    cfg = config()
    run_id = start_workflow_run(cfg, invocation_id="inv-hygiene")
    assert run_id and os.environ[ENV_PARENT_RUN] == run_id
    finish_workflow_run(cfg, "FINISHED")

def test_2_sees_no_parent_run():
    assert ENV_PARENT_RUN not in os.environ
    assert ENV_INVOCATION not in os.environ
    assert not [k for k in os.environ if k.startswith("MLFLOW_HTTP_")]
"""
    )
    inner.runpytest().assert_outcomes(passed=2)


XDIST_CONFTEST = """
import os
from pathlib import Path

import pytest

from tests.conftest import (  # noqa: F401
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
)


@pytest.fixture(scope="session")
def slurm_cluster():
    return "cluster"


@pytest.fixture(scope="session")
def tiny_local_pipeline():
    return "pipeline"


@pytest.fixture(autouse=True)
def record(request):
    import torch

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(Path(os.environ["XDIST_RECORD"]), "a") as fh:
        node = request.node.nodeid.split("@")[0]  # xdist appends @<group>
        fh.write(f"{worker} {node} {torch.get_num_threads()}\\n")
"""


def test_make_test_workers_keep_the_slurm_tests_together_and_first(pytester, monkeypatch,
                                                                   tmp_path):
    """``make test``'s xdist split (tests/conftest.py ``XDIST_UNITS``): the SLURM tests, from
    several files, run on one worker before anything else there (one cluster per machine); the
    other tiny-pipeline users run first on the other worker; each other file stays on one
    worker; every worker runs torch on one thread."""
    pytest.importorskip("xdist")  # the dev extra's pytest-xdist, which make test runs on
    pytester.makeconftest(XDIST_CONFTEST)
    pytester.makeini("[pytest]\naddopts = -p no:randomly\n")
    plain = "".join(f"def test_{i}(): pass\n" for i in range(6))
    pytester.makepyfile(
        test_a_plain=plain,
        test_b_cluster="def test_1(slurm_cluster): pass\ndef test_2(): pass\n",
        test_c_plain=plain,
        test_d_tiny="def test_1(tiny_local_pipeline): pass\n"
                    "def test_2(tiny_local_pipeline): pass\n",
        test_e_cluster="def test_1(slurm_cluster, tiny_local_pipeline): pass\n"
                       "def test_2(slurm_cluster): pass\n",
    )
    monkeypatch.setenv("XDIST_RECORD", str(tmp_path / "record.txt"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup",
                                           "--no-loadscope-reorder")
    result.assert_outcomes(passed=18)
    runs = [line.split() for line in (tmp_path / "record.txt").read_text().splitlines()]
    order = {w: [node for worker, node, _ in runs if worker == w] for w, _, _ in runs}
    assert {threads for _, _, threads in runs} == {"1"}, runs
    cluster = ["test_b_cluster.py::test_1", "test_e_cluster.py::test_1",
               "test_e_cluster.py::test_2"]
    [slurm_worker] = [w for w, nodes in order.items() if nodes[:3] == cluster]
    [tiny_worker] = [w for w, nodes in order.items() if w != slurm_worker]
    assert order[tiny_worker][:2] == ["test_d_tiny.py::test_1", "test_d_tiny.py::test_2"], order
    for name in ("test_a_plain.py", "test_c_plain.py"):
        assert len({w for w, nodes in order.items() for n in nodes if n.startswith(name)}) == 1
