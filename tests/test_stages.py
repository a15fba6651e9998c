"""How a training stage is launched: one process, torchrun on one node, srun on several."""

from __future__ import annotations

import sys

import pytest

from mofo.stages import StageFailed, run_stage_module, stage_command


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
        run_stage_module("json.tool", [str(tmp_path / "missing.json")], {"a": 1}, tmp_path)
    assert (tmp_path / "config.yaml").read_text().strip() == "a: 1"
