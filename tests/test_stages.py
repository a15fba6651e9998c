"""How a training stage is launched: one process, torchrun on one node, srun on several."""

from __future__ import annotations

import sys

import pytest
import yaml

from mofo.config import load_config
from mofo.stages import StageFailed, run_stage_module, stage_command

CONFIG = load_config()  # the stage's config, written beside its outputs


def test_one_process():
    assert stage_command("mofo.training.pretrain", ["--out", "x"], 1) == [
        sys.executable, "-m", "mofo.training.pretrain", "--out", "x",
    ]


def test_several_gpus_of_one_node_use_torchrun_standalone():
    cmd = stage_command("mofo.training.finetune", ["--head", "mca"], 4)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert cmd[5:] == ["-m", "mofo.training.finetune", "--head", "mca"]


def test_several_nodes_use_srun_with_one_task_per_gpu():
    cmd = stage_command("mofo.training.pretrain", ["--masking", "mofo"], 4, nodes=2)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    rendezvous = cmd[cmd.index("-c") + 1]
    assert "MASTER_ADDR" in rendezvous and "SLURM_JOB_NODELIST" in rendezvous and "MASTER_PORT" in rendezvous
    assert cmd[-4:] == ["-m", "mofo.training.pretrain", "--masking", "mofo"]


def test_a_failing_stage_names_itself(tmp_path):
    with pytest.raises(StageFailed, match="json.tool"):
        # json.tool exits non-zero on a missing input file: a real failing module
        run_stage_module("json.tool", [str(tmp_path / "missing.json")], CONFIG, tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == CONFIG


FAKE_STAGE = '''
import json, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
if "--marker" in sys.argv:  # what a torchrun worker leaves when it stops for a requeue
    (out / "requeue.json").write_text(json.dumps({"step": 3}))
    sys.exit(1)  # torchrun reports any failed worker as 1
def stop(signum, frame):
    (out / "signal.txt").write_text(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
(out / "ready").touch()
time.sleep(60)
sys.exit(0)
'''


@pytest.fixture
def fake_stage(tmp_path, monkeypatch):
    (tmp_path / "fake_stage.py").write_text(FAKE_STAGE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_a_requeue_marker_turns_torchruns_exit_1_into_the_requeue_code(fake_stage):
    with pytest.raises(SystemExit) as stopped:
        run_stage_module("fake_stage", ["--out", str(fake_stage), "--marker"], CONFIG, fake_stage)
    assert stopped.value.code == 75


def test_slurms_warning_signal_is_passed_on_to_the_stage(fake_stage):
    import os
    import signal
    import threading
    import time

    def signal_when_ready():
        for _ in range(300):
            if (fake_stage / "ready").exists():
                os.kill(os.getpid(), signal.SIGUSR1)  # what --signal=USR1@<s> sends
                return
            time.sleep(0.05)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        run_stage_module("fake_stage", ["--out", str(fake_stage)], CONFIG, fake_stage)
    assert stopped.value.code == 75
    assert (fake_stage / "signal.txt").read_text() == "SIGTERM"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored


def test_a_job_trains_on_its_own_threads_unless_the_config_says_otherwise():
    from mofo.stages import with_job_threads

    cfg = {"engine": {"cpu_threads": 0}}
    assert with_job_threads(cfg, 4)["engine"]["cpu_threads"] == 4
    assert with_job_threads(cfg, 4, nproc=2)["engine"]["cpu_threads"] == 2
    assert with_job_threads(cfg, 1, nproc=2)["engine"]["cpu_threads"] == 1
    assert with_job_threads(cfg, None) is cfg
    assert with_job_threads({"engine": {"cpu_threads": 3}}, 8)["engine"]["cpu_threads"] == 3
    assert cfg["engine"]["cpu_threads"] == 0  # not changed in place
