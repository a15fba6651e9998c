"""Unit tests for mofo.tracking against a local MLflow store (no server needed)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

# Required packages, imported directly: a broken install must fail here, not skip.
import mlflow  # noqa: F401
import pytest

from mofo.config import load_config
from mofo.tracking import (
    ENV_INVOCATION,
    ENV_PARENT_RUN,
    ENV_STAGE_RUN,
    attach_stage_run,
    config_hash,
    finish_workflow_run,
    flatten,
    reset_process_state,
    resolve_settings,
    stage_run,
    start_workflow_run,
    workflow_record_path,
)
from mofo.tracking import client as tracking_client


@pytest.fixture(autouse=True)
def clean_tracking_env(monkeypatch):
    """Each test starts with no parent run, no server URI and a fresh warn-once state."""
    for var in (
        ENV_PARENT_RUN,
        ENV_INVOCATION,
        ENV_STAGE_RUN,
        "MLFLOW_TRACKING_URI",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    ):
        monkeypatch.delenv(var, raising=False)
    reset_process_state()
    yield
    reset_process_state()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One results dir (and SQLite store) for the module: creating the schema takes seconds."""
    return tmp_path_factory.mktemp("results")


def make_config(results: Path, experiment: str, **mlflow_overrides) -> dict:
    section = {"experiment": experiment, **mlflow_overrides}
    return load_config(overrides={"results_dir": str(results), "tracking": {"mlflow": section}})


def client_for(config):
    from mlflow.tracking import MlflowClient

    return MlflowClient(resolve_settings(config).uri)


def runs_by_name(config) -> dict:
    client = client_for(config)
    exp = client.get_experiment_by_name(config["tracking"]["mlflow"]["experiment"])
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_flatten_nested_sections_and_lists():
    flat = flatten({"optical_flow": {"tvl1": {"tau": 0.25}, "keep": False, "scales": [1, 0.5]}})
    assert flat == {
        "optical_flow.tvl1.tau": "0.25",
        "optical_flow.keep": "false",
        "optical_flow.scales": "[1, 0.5]",
    }
    assert len(flatten({"x": "a" * 10000})["x"]) == 6000


def test_config_hash_ignores_key_order_and_sees_changes():
    assert config_hash({"a": 1, "b": {"c": 2}}) == config_hash({"b": {"c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_uri_precedence(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, "e")
    assert resolve_settings(cfg).uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert resolve_settings(cfg).artifact_location.endswith("mlflow-artifacts")
    cfg = make_config(tmp_path, "e", tracking_uri="http://example.org:5000")
    assert resolve_settings(cfg).uri == "http://example.org:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1234")
    assert resolve_settings(cfg).uri == "http://127.0.0.1:1234"


def test_parent_and_child_runs_with_params_metrics_artifacts(store, tmp_path):
    cfg = make_config(store, "nesting")
    parent = start_workflow_run(cfg, invocation_id="inv123")
    assert parent is not None
    record = json.loads(workflow_record_path(cfg).read_text())
    assert record["run_id"] == parent and record["invocation_id"] == "inv123"

    log = tmp_path / "decode.log"
    log.write_text("decoded 3 clips\n")
    figure = tmp_path / "fig.png"
    figure.write_bytes(b"\x89PNG fake")
    with stage_run(
        cfg, "decode", {"shard": "shard-0003"}, sections=("decode", "model"), log_path=log
    ) as tracker:
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "note": "not a number"}, step=step)
        tracker.log_metrics({"epoch_acc": 0.5}, step=0)
        tracker.log_artifact(figure, "figures")
        tracker.log_artifact(tmp_path / "missing.png", "figures")  # skipped, no error

    bench = Path(cfg["results_dir"]) / "demo" / "benchmarks" / "decode"
    bench.mkdir(parents=True, exist_ok=True)
    (bench / "shard-0003.tsv").write_text("s\th:m:s\tmax_rss\n2.5\t0:00:02\t123.0\n")
    finish_workflow_run(cfg, "FINISHED", log=log)

    runs = runs_by_name(cfg)
    child = runs["decode-shard-0003"]
    top = runs["workflow-inv123"]
    assert child.data.tags["mlflow.parentRunId"] == parent == top.info.run_id
    assert child.data.tags["mofo.rule"] == "decode"
    assert child.data.tags["mofo.shard"] == "shard-0003"
    assert json.loads(child.data.tags["mofo.wildcards"]) == {"shard": "shard-0003"}
    assert child.data.tags["mofo.config_hash"] == config_hash(cfg)
    assert child.data.tags["mofo.invocation_id"] == "inv123"
    assert "mofo.git_commit" in child.data.tags
    assert child.data.params["decode.short_side"] == str(cfg["decode"]["short_side"])
    assert child.data.params["model.patch_size"] == str(cfg["model"]["patch_size"])
    assert child.info.status == "FINISHED" and top.info.status == "FINISHED"
    client = client_for(cfg)
    history = client.get_metric_history(child.info.run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert "note" not in child.data.metrics
    assert child.data.metrics["benchmark.s"] == 2.5
    child_files = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
    assert child_files == {"figures/fig.png"}
    assert [a.path for a in client.list_artifacts(child.info.run_id, "logs")] == ["logs/decode.log"]
    top_files = {a.path for a in client.list_artifacts(top.info.run_id)}
    assert {"config.yaml", "logs", "benchmarks"} <= top_files
    assert json.loads(workflow_record_path(cfg).read_text())["status"] == "FINISHED"


def test_failed_stage_marks_run_failed_and_keeps_log(store, tmp_path):
    cfg = make_config(store, "failing")
    log = tmp_path / "stage.log"
    log.write_text("about to fail\n")
    with (
        pytest.raises(ValueError, match="bad clip"),
        stage_run(cfg, "optical_flow", {"shard": "shard-0000"}, log_path=log),
    ):
        raise ValueError("bad clip")
    with pytest.raises(SystemExit), stage_run(cfg, "pretrain", {}):
        raise SystemExit(75)  # preempted: checkpoint written, job exits non-zero
    runs = runs_by_name(cfg)
    failed = runs["optical_flow-shard-0000"]
    assert failed.info.status == "FAILED"
    assert "mlflow.parentRunId" not in failed.data.tags  # no workflow run: stands alone
    assert runs["pretrain"].info.status == "KILLED"
    logs = client_for(cfg).list_artifacts(failed.info.run_id, "logs")
    assert [a.path for a in logs] == ["logs/stage.log"]


def test_disabled_tracking_touches_nothing(tmp_path):
    cfg = make_config(tmp_path, "off", enabled=False)
    assert start_workflow_run(cfg) is None
    with stage_run(cfg, "decode", {"shard": "shard-0000"}) as tracker:
        tracker.log_metrics({"x": 1.0}, step=1)
        tracker.log_artifact(__file__)
        assert not tracker.active
    finish_workflow_run(cfg)
    assert not (tmp_path / "mlflow.db").exists()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the socket is


def test_dead_server_warns_once_and_loses_no_output(tmp_path, monkeypatch, caplog):
    """A tracking server that is down: outputs still written, one warning naming the URI,
    and one connection attempt in total (later calls are skipped, so no timeout piles up)."""
    import requests

    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    attempts = []
    real_get = requests.get
    monkeypatch.setattr(requests, "get", lambda *a, **k: attempts.append(a[0]) or real_get(*a, **k))
    cfg = make_config(tmp_path, "dead")
    out = tmp_path / "boxes.csv"
    with caplog.at_level(logging.WARNING, logger="mofo.tracking"):
        assert start_workflow_run(cfg) is None
        for shard in range(3):
            with stage_run(
                cfg,
                "motion_boxes",
                {"shard": f"shard-{shard:04d}"},
                sections=("motion_boxes",),
                log_path=out,
            ) as tracker:
                out.write_text(f"clip_id,frame\nc{shard},0\n")
                tracker.log_metrics({"boxes": 1.0}, step=0)
                tracker.log_artifact(out)
        finish_workflow_run(cfg, "FINISHED")
    assert out.read_text() == "clip_id,frame\nc2,0\n"
    warnings = [
        r for r in caplog.records if r.name == "mofo.tracking" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert attempts == [uri + "/health"]
    assert not (tmp_path / "mlflow.db").exists()


def test_server_error_mid_run_disables_tracking(store, monkeypatch, caplog):
    """An error from the store during a stage (not only at start) is swallowed once."""
    cfg = make_config(store, "midrun")
    calls = []
    def boom(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("server went away")

    with (
        caplog.at_level(logging.WARNING, logger="mofo.tracking"),
        stage_run(cfg, "decode", {"shard": "shard-0001"}) as tracker,
    ):
        assert tracker.active
        monkeypatch.setattr(tracker.client._get(), "log_batch", boom)
        tracker.log_metrics({"a": 1.0}, step=0)
        tracker.flush()
        tracker.log_metrics({"a": 2.0}, step=1)
        tracker.flush()
        assert not tracker.active
    assert len(calls) == 1
    assert sum("server went away" in r.getMessage() for r in caplog.records) == 1
    assert tracking_client._DISABLED


def test_training_log_records_live_and_from_jsonl(store, tmp_path):
    """metrics.jsonl lines: step records by global step, epoch records prefixed by epoch; a
    child process can log live to the open stage run through attach_stage_run."""
    cfg = make_config(store, "jsonl")
    lines = [
        {
            "time": 1.0,
            "type": "step",
            "stage": "pretrain-tube",
            "epoch": 0,
            "step": 1,
            "loss": 1.5,
            "lr": 0.1,
        },
        {
            "time": 2.0,
            "type": "step",
            "stage": "pretrain-tube",
            "epoch": 0,
            "step": 2,
            "loss": 1.25,
            "lr": 0.2,
        },
        {
            "time": 3.0,
            "type": "epoch",
            "stage": "pretrain-tube",
            "epoch": 0,
            "step": 2,
            "loss": 1.4,
            "seconds": 3.0,
        },
        {"time": 4.0, "type": "end", "stage": "pretrain-tube", "step": 2, "epoch": 1},
    ]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"cut by a ki')
    with stage_run(cfg, "pretrain", {"masking": "tube"}) as tracker:
        assert os.environ[ENV_STAGE_RUN] == tracker.run_id
        attached = attach_stage_run(cfg)  # as a torchrun worker would
        assert attached.run_id == tracker.run_id
        attached.log_record({"type": "step", "step": 7, "live_loss": 0.5})
        attached.flush()
        assert tracker.log_jsonl(jsonl) == 4
    assert ENV_STAGE_RUN not in os.environ
    run = runs_by_name(cfg)["pretrain-tube"]
    client = client_for(cfg)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (1, 1.5),
        (2, 1.25),
    ]
    assert [
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch_loss")
    ] == [(0, 1.4)]
    assert run.data.metrics["epoch_seconds"] == 3.0
    assert run.data.metrics["live_loss"] == 0.5
    assert "time" not in run.data.metrics and "epoch" not in run.data.metrics
    assert not attach_stage_run(cfg).active  # no open stage run any more


def test_log_summary_flattens_numeric_leaves(store, tmp_path):
    cfg = make_config(store, "summary")
    report = tmp_path / "box_quality.json"
    report.write_text(
        json.dumps(
            {
                "iou": {"mean": 0.5, "median": 0.25},
                "clips": 16,
                "method": "motion_map",
                "detected": True,
                "topk": [1, 5],
            }
        )
    )
    with stage_run(cfg, "box_quality") as tracker:
        tracker.log_summary(report)
        tracker.log_summary({"top1": 0.75}, prefix="eval")
        tracker.log_summary(tmp_path / "missing.json")  # logged as info, no error
    metrics = runs_by_name(cfg)["box_quality"].data.metrics
    assert metrics == {"iou.mean": 0.5, "iou.median": 0.25, "clips": 16.0, "eval.top1": 0.75}
