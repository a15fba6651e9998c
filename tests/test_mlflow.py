"""MLflow tracking through Snakemake against a real ``mlflow server`` (marker ``mlflow``).

The server (tests/cluster/mlflow_server.py, fixture ``mlflow_tracking_server``) runs on
127.0.0.1 with a SQLite backend and proxied artifacts. A small Snakefile wired exactly like the
pipeline's (``onstart``/``onsuccess``/``onerror`` hooks, ``stage_run_from_snakemake`` in the
scripts) runs as separate processes; the checks go through ``MlflowClient``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.mlflow

SNAKEFILE = """
from mofo.tracking import finish_workflow_run, start_workflow_run

configfile: "config.yaml"

RESULTS = config["results_dir"] + "/" + config["dataset"]["name"]
SHARDS = ["shard-0000", "shard-0001"]

onstart:
    start_workflow_run(config)

onsuccess:
    finish_workflow_run(config, "FINISHED", log)

onerror:
    finish_workflow_run(config, "FAILED", log)

rule all:
    input: RESULTS + "/pretrain/model.txt"

rule decode:
    output: RESULTS + "/decode/{shard}.txt"
    log: RESULTS + "/logs/decode/{shard}.log"
    benchmark: RESULTS + "/benchmarks/decode/{shard}.tsv"
    script: "stage.py"

rule pretrain:
    input: expand(RESULTS + "/decode/{shard}.txt", shard=SHARDS)
    output: RESULTS + "/pretrain/model.txt"
    log: RESULTS + "/logs/pretrain.log"
    benchmark: RESULTS + "/benchmarks/pretrain.tsv"
    script: "stage.py"
"""

STAGE = """
from pathlib import Path
from mofo.logs import job_log
from mofo.tracking import stage_run_from_snakemake

sm = snakemake
# stage_run outside job_log: the log (with a failure's traceback) is complete when uploaded.
with stage_run_from_snakemake(sm, sections=(sm.rule,)) as tracker, job_log(sm.log[0]):
    print(f"running {sm.rule} {dict(sm.wildcards.items())}")
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    Path(sm.output[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(sm.output[0]).write_text(f"{sm.rule} output\\n")
    tracker.log_artifact(sm.output[0], "outputs")
"""

CONFIG = {
    "results_dir": "results",
    "dataset": {"name": "demo"},
    "tracking": {
        "mlflow": {
            "enabled": True,
            "experiment": "mofo-test",
            "tracking_uri": "",
            "log_artifacts": True,
            "max_artifact_mb": 10,
            "request_timeout": 5,
            "request_retries": 0,
        }
    },
    "decode": {"short_side": 96, "jpeg_quality": 90},
    "pretrain": {"epochs": 2, "lr": 0.001},
}


def write_workflow(folder: Path, experiment: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Snakefile").write_text(SNAKEFILE)
    (folder / "stage.py").write_text(STAGE)
    config = json.loads(json.dumps(CONFIG))
    config["tracking"]["mlflow"]["experiment"] = experiment
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def run_snakemake(
    folder: Path,
    uri: str,
    extra: list[str] = (),
    timeout: int = 400,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Snakemake on ``folder`` tracked to ``uri``; no MLflow credentials unless ``extra_env``
    has them (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``)."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    for var in (
        "MOFO_MLFLOW_PARENT_RUN_ID",
        "MOFO_INVOCATION_ID",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        env.pop(var, None)
    env.update(extra_env or {})
    cmd = [
        "timeout",
        "-s",
        "INT",
        str(timeout),
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        "2",
        "-d",
        str(folder),
        "-s",
        str(folder / "Snakefile"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def runs_of(client, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def check_tracked_workflow(client, folder: Path, experiment: str) -> dict:
    """The checks shared by the local and the SLURM run; returns the runs by name."""
    record = json.loads((folder / "results/demo/tracking/workflow_run.json").read_text())
    runs = runs_of(client, experiment)
    parent = runs[f"workflow-{record['invocation_id']}"]
    assert parent.info.run_id == record["run_id"]
    assert parent.info.status == "FINISHED" and record["status"] == "FINISHED"
    children = {name: r for name, r in runs.items() if name != parent.info.run_name}
    assert set(children) == {"decode-shard-0000", "decode-shard-0001", "pretrain"}
    for name, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["mofo.invocation_id"] == record["invocation_id"]
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history] == [0, 1, 2]
        assert child.data.metrics["benchmark.s"] >= 0  # from the benchmark file, at the end
        files = {a.path for a in client.list_artifacts(child.info.run_id, "logs")}
        assert (
            len(files) == 1
            and "running"
            in Path(
                client.download_artifacts(child.info.run_id, files.pop(), str(folder / "dl" / name))
            ).read_text()
        )
        assert client.list_artifacts(child.info.run_id, "outputs")
    decode = children["decode-shard-0001"]
    assert decode.data.tags["mofo.rule"] == "decode"
    assert decode.data.tags["mofo.shard"] == "shard-0001"
    assert decode.data.params["decode.short_side"] == "96"
    assert children["pretrain"].data.params["pretrain.epochs"] == "2"
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "logs", "benchmarks"} <= parent_files
    bench = {a.path for a in client.list_artifacts(parent.info.run_id, "benchmarks/decode")}
    assert bench == {"benchmarks/decode/shard-0000.tsv", "benchmarks/decode/shard-0001.tsv"}
    return runs


def test_workflow_runs_nest_under_one_parent_on_a_server(mlflow_tracking_server, tmp_path):
    folder = write_workflow(tmp_path / "wf", "nesting")
    proc = run_snakemake(folder, mlflow_tracking_server.uri)
    assert proc.returncode == 0, proc.stderr[-5000:]
    client = mlflow_tracking_server.client()
    runs = check_tracked_workflow(client, folder, "nesting")
    # Proxied artifacts: the files are on the server's side, not in the client's folder.
    assert list((mlflow_tracking_server.workdir / "artifacts").rglob("shard-0000.txt"))
    assert not (folder / "results" / "mlflow.db").exists()

    # A second invocation (here: forced rerun of one shard) gets its own parent run.
    proc = run_snakemake(
        folder,
        mlflow_tracking_server.uri,
        [
            "--forcerun",
            "decode",
            "--allowed-rules",
            "decode",
            "--",
            "results/demo/decode/shard-0000.txt",
        ],
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    exp = client.get_experiment_by_name("nesting").experiment_id
    old_ids = {r.info.run_id for r in runs.values()}
    new = [r for r in client.search_runs([exp]) if r.info.run_id not in old_ids]
    assert sorted(r.info.run_name.split("-")[0] for r in new) == ["decode", "workflow"]
    parent = next(r for r in new if r.info.run_name.startswith("workflow-"))
    child = next(r for r in new if r.info.run_name == "decode-shard-0000")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (
        child.data.tags["mofo.invocation_id"]
        != runs["decode-shard-0000"].data.tags["mofo.invocation_id"]
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dead_server_does_not_stop_the_workflow(tmp_path):
    """Tracking server down: every output is written, each job warns once, naming the URI."""
    folder = write_workflow(tmp_path / "wf", "dead")
    uri = f"http://127.0.0.1:{closed_port()}"
    proc = run_snakemake(folder, uri)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = folder / "results" / "demo"
    assert (results / "pretrain/model.txt").read_text() == "pretrain output\n"
    for shard in ("shard-0000", "shard-0001"):
        assert (results / f"decode/{shard}.txt").read_text() == "decode output\n"
        assert "running decode" in (results / f"logs/decode/{shard}.log").read_text()
    # One warning per process: the onstart hook's and one per job (3 jobs), none per metric.
    assert proc.stderr.count("MLflow tracking at " + uri) == 4, proc.stderr[-5000:]
    assert not (folder / "results" / "mlflow.db").exists()


JOB_ACCOUNT = ("mofo-jobs", "jobs-password-1234")  # test server only


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on 127.0.0.1 (admin from the environment)."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    from tests.cluster.mlflow_server import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), auth=True) as server:
        yield server


def test_shared_server_needs_credentials(mlflow_auth_server, tmp_path, monkeypatch):
    """README "MLflow": a shared server with basic auth. Jobs that have an account's
    credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (inherited like the URI)
    log as usual; without them every API request is refused (401), each job warns once, names
    the URI, and writes its outputs anyway."""
    import requests

    server = mlflow_auth_server
    server.create_user(*JOB_ACCOUNT)
    search = (server.uri + "/api/2.0/mlflow/experiments/search", {"max_results": 1})
    assert requests.get(*search, timeout=60).status_code == 401
    assert (
        requests.get(*search, auth=(JOB_ACCOUNT[0], "not-the-password"), timeout=60).status_code
        == 401
    )
    assert requests.get(*search, auth=JOB_ACCOUNT, timeout=60).status_code == 200
    assert requests.get(server.uri + "/health", timeout=60).status_code == 200  # jobs' probe

    folder = write_workflow(tmp_path / "account", "with-account")
    account = {
        "MLFLOW_TRACKING_USERNAME": JOB_ACCOUNT[0],
        "MLFLOW_TRACKING_PASSWORD": JOB_ACCOUNT[1],
    }
    proc = run_snakemake(folder, server.uri, extra_env=account)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "MLflow tracking at" not in proc.stderr, proc.stderr[-5000:]
    for var, value in server.admin_env().items():  # the checks read as the admin
        monkeypatch.setenv(var, value)
    client = server.client()
    check_tracked_workflow(client, folder, "with-account")

    # No credentials (and no ~/.mlflow/credentials file: HOME is empty): refused, not blocked.
    folder = write_workflow(tmp_path / "anonymous", "anonymous")
    proc = run_snakemake(folder, server.uri, extra_env={"HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = folder / "results" / "demo"
    assert (results / "pretrain/model.txt").read_text() == "pretrain output\n"
    for shard in ("shard-0000", "shard-0001"):
        assert (results / f"decode/{shard}.txt").read_text() == "decode output\n"
    # One warning per process (the onstart hook and 3 jobs), each naming the refusal.
    warnings = [x for x in proc.stderr.splitlines() if "MLflow tracking at " + server.uri in x]
    assert len(warnings) == 4, proc.stderr[-5000:]
    assert all("401" in w for w in warnings), warnings
    assert client.get_experiment_by_name("anonymous") is None


OWNER_ACCOUNT = ("mofo-owner", "owner-password-1234")  # test server only
READER_ACCOUNT = ("mofo-reader", "reader-password-1234")


def test_shared_server_credentials_file_and_no_permission(mlflow_auth_server, tmp_path,
                                                          monkeypatch):
    """docs/CLUSTER.md "MLflow": credentials kept in ``~/.mlflow/credentials`` (no variables
    set) are read by every job, which logs as usual; the variables win over the file; an
    account without permission on the experiment (``default_permission = READ``, the
    experiment made by another account) is refused with 403: each job warns once, naming the
    URI and the refusal, writes its outputs, and nothing is logged."""
    from mlflow.server import get_app_client

    server = mlflow_auth_server
    server.create_user(*OWNER_ACCOUNT)
    server.create_user(*READER_ACCOUNT)
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    credentials = home / ".mlflow" / "credentials"
    credentials.touch(mode=0o600)
    credentials.write_text(f"[mlflow]\nmlflow_tracking_username = {OWNER_ACCOUNT[0]}\n"
                           f"mlflow_tracking_password = {OWNER_ACCOUNT[1]}\n")

    folder = write_workflow(tmp_path / "file", "from-file")
    proc = run_snakemake(folder, server.uri, extra_env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "MLflow tracking at" not in proc.stderr, proc.stderr[-5000:]
    for var, value in server.admin_env().items():  # the checks read as the admin
        monkeypatch.setenv(var, value)
    client = server.client()
    runs = check_tracked_workflow(client, folder, "from-file")
    # The file's account made the experiment: the auth app gave it MANAGE, the reader READ.
    experiment = client.get_experiment_by_name("from-file").experiment_id
    auth = get_app_client("basic-auth", tracking_uri=server.uri)
    for account, permission in ((OWNER_ACCOUNT, "MANAGE"), (READER_ACCOUNT, "READ")):
        got = auth.get_user_permission(account[0], "experiment", experiment).permission
        assert got == permission, (account[0], got)

    # The reader's variables beside the owner's file: the variables win, and the reader may
    # read the owner's experiment but not log to it. One shard: the onstart hook and one job.
    folder = write_workflow(tmp_path / "reader", "from-file")
    reader = {"HOME": str(home), "MLFLOW_TRACKING_USERNAME": READER_ACCOUNT[0],
              "MLFLOW_TRACKING_PASSWORD": READER_ACCOUNT[1]}
    proc = run_snakemake(folder, server.uri, ["--", "results/demo/decode/shard-0000.txt"],
                         extra_env=reader)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (folder / "results/demo/decode/shard-0000.txt").read_text() == "decode output\n"
    warnings = [x for x in proc.stderr.splitlines() if "MLflow tracking at " + server.uri in x]
    assert len(warnings) == 2, proc.stderr[-5000:]
    assert all("403" in w for w in warnings), warnings
    assert runs_of(client, "from-file").keys() == runs.keys()  # nothing logged by the reader


def test_local_store_is_the_default(tmp_path):
    """No URI anywhere: runs go to <results_dir>/mlflow.db, artifacts next to it."""
    from mlflow.tracking import MlflowClient

    folder = write_workflow(tmp_path / "wf", "local")
    env_uri = ""  # an empty MLFLOW_TRACKING_URI counts as unset
    proc = run_snakemake(folder, env_uri)
    assert proc.returncode == 0, proc.stderr[-5000:]
    db = folder / "results" / "mlflow.db"
    assert db.exists()
    client = MlflowClient(f"sqlite:///{db}")
    check_tracked_workflow(client, folder, "local")
    assert list((folder / "results" / "mlflow-artifacts").rglob("pretrain.log"))


def test_tiny_pipeline_tracked_on_a_server(mlflow_tracking_server, tiny_local_pipeline):
    """The real pipeline (tiny config, local executor, 2 cores) against the server: one parent,
    one child per job with its rule tag, training losses by step, evaluation accuracies, the
    results table and the final models as artifacts."""
    from collections import Counter

    work = tiny_local_pipeline
    client = mlflow_tracking_server.client()
    record = json.loads((work / "results/demo/tracking/workflow_run.json").read_text())
    parent = client.get_run(record["run_id"])
    assert parent.info.status == "FINISHED"
    exp = parent.info.experiment_id
    children = client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000
    )
    per_rule = Counter(r.data.tags.get("mofo.rule") for r in children)
    results = work / "results" / "demo"
    shards = len(list((results / "frames").glob("*.jpgpack")))
    variants = len(list((results / "eval").glob("*/s*/metrics.json")))
    assert shards >= 2 and variants >= 2
    expected = {
        "demo_data": 1,
        "manifest": 1,
        "decode": shards,
        "optical_flow": shards,
        "motion_map": shards,
        "motion_boxes": shards,
        "motion_pictures": shards,
        "box_quality": 1,
        "pretrain": len(list((results / "pretrain").glob("*/s*/checkpoint.pt"))),
        "finetune": variants,
        "evaluate": variants,
        # every pretrained encoder and the random reference, once per seed
        "features": len(list((results / "features").glob("*/s*/train.npz"))),
        "probe": len(list((results / "probe").glob("*/s*/metrics.json"))),
        "table": 1,
    }
    assert expected["features"] == expected["pretrain"] + 1 == expected["probe"]
    assert dict(per_rule) == expected
    for run in children:
        rule = run.data.tags["mofo.rule"]
        assert run.info.status == "FINISHED", rule
        assert run.data.tags["mofo.config_hash"] == parent.data.tags["mofo.config_hash"]
        assert client.list_artifacts(run.info.run_id, "logs"), f"{rule}: no log uploaded"
        if rule in ("pretrain", "finetune"):
            assert len(client.get_metric_history(run.info.run_id, "loss")) > 1, rule
            # the batch plan as run and the recipe, in the params (mofo.recipe.batch)
            assert run.data.params[f"{rule}.plan.exact"].lower() == "true", rule
            assert run.data.params["recipe"].startswith("own (demo"), rule
            assert client.list_artifacts(run.info.run_id, "models"), f"{rule}: no model"
        if rule == "evaluate":
            assert any("top1" in key for key in run.data.metrics), run.data.metrics
        if rule == "decode":
            assert run.data.tags["mofo.shard"].startswith("shard-")
            assert "decode.short_side" in run.data.params
    table = next(r for r in children if r.data.tags["mofo.rule"] == "table")
    assert {"table.csv", "table.md"} <= {
        Path(a.path).name for a in client.list_artifacts(table.info.run_id, "results")
    }
    assert client.list_artifacts(parent.info.run_id, "benchmarks")
