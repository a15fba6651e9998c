"""Reruns do what the user means (real Snakemake runs on the tiny CI config).

A forced or triggered rerun of a training stage trains from step 0; a change reruns the
stages that read it (``mofo.provenance.STAGE_READS``) and nothing upstream; a setting a stage
does not read reruns nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_workflow import job_counts

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / ".test" / "config" / "tiny.yaml"
TARGET = "finetune/mofo-mean/s0/checkpoint.pt"


class Run:
    """One tiny results folder and the snakemake command lines that work on it."""

    def __init__(self, root: Path):
        self.root = root
        self.res = root / "results" / "demo"
        self.paths = root / "paths.yaml"
        self.paths.write_text(yaml.safe_dump({
            "results_dir": str(root / "results"),
            "dataset": {"demo": {"root": str(root / "demo")}},
            "tracking": {"mlflow": {"enabled": False}},
        }))

    def overlay(self, name: str, content: dict) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(content))
        return path

    def snakemake(self, *args: str, overlays: tuple[Path, ...] = (), target: str = TARGET,
                  timeout: int = 900) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "--nolock", "--cores", "2",
               str(self.res / target), *args,
               "--configfile", str(TINY), str(self.paths), *map(str, overlays)]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    def dry_run(self, *overlays: Path, target: str = TARGET) -> dict[str, int]:
        out = self.snakemake("-n", overlays=overlays, target=target).stdout
        return {} if "Nothing to be done" in out else job_counts(out)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_trained_from_step_zero(stage_dir: Path, log: Path, since: float,
                                  expected_steps: int) -> None:
    """Every metrics record was written by the rerun, its steps run 1..N in full, the job's
    log (Snakemake starts it anew per job) has no 'resuming' line, and no checkpoint-last.pt
    is left behind."""
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["time"] >= since for r in records), "old metrics were kept"
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, expected_steps + 1)), steps
    assert records[-1]["type"] == "end" and records[-1]["step"] == expected_steps
    assert log.stat().st_mtime >= since and "running:" in log.read_text()
    assert "resuming from" not in log.read_text(), log.read_text()[-2000:]
    assert not (stage_dir / "checkpoint-last.pt").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Run:
    """Motion chain, `mofo` pretraining and `mofo-mean` fine-tuning of the tiny demo, once.
    Tests that use it only dry-run; the ones that rerun build their own."""
    run = Run(tmp_path_factory.mktemp("reruns-built"))
    run.snakemake()
    return run


@pytest.mark.slow
def test_changed_settings_rerun_exactly_the_stages_that_read_them(built: Run):
    assert built.dry_run() == {}
    # A box setting: boxes and everything trained on them; never the flow or what feeds it.
    boxes = built.dry_run(built.overlay("boxes", {"motion_boxes": {"rel_max_threshold": 0.3}}))
    assert boxes == {"motion_boxes": 2, "pretrain": 1, "finetune": 1, "total": 4}, boxes
    # Fine-tuning augmentation: fine-tuning only.
    aug = built.dry_run(built.overlay("aug", {"augment": {"random_erasing": 0.25}}))
    assert aug == {"finetune": 1, "total": 1}, aug
    # Settings no built stage reads: logging, loader workers, threads, test views, the demo's
    # picture count is read by flow (so it is not here).
    unread = built.overlay("unread", {
        "pretrain": {"log_interval": 3, "num_workers": 1, "n_reconstruction_clips": 2,
                     "target": "mme", "mme": {"cell": 4}},  # the pretraining name sets target
        "trajectories": {"steps": 2},  # read by trajectories and mme pretrainings only
        "finetune": {"checkpoint_every": 2},
        "engine": {"threads_per_job": 2, "cpu_threads": 2},
        "augment": {"test_crops": 3},
        "decode": {"threads": 2},
        "masking": {"strategy": "tube"},
    })
    assert built.dry_run(unread) == {}


@pytest.mark.slow
def test_forced_and_triggered_reruns_train_from_step_zero(tmp_path: Path):
    run = Run(tmp_path)
    run.snakemake()
    pre_dir, ft_dir = run.res / "pretrain" / "mofo" / "s0", run.res / "finetune" / "mofo-mean" / "s0"
    pre_log, ft_log = run.res / "logs" / "pretrain" / "mofo-s0.log", run.res / "logs" / "finetune" / "mofo-mean-s0.log"
    steps = 2 * (12 // 4)  # tiny: 2 epochs of 12 clips in batches of 4
    first = weights(pre_dir / "checkpoint.pt")
    assert not (pre_dir / "checkpoint-last.pt").exists(), "a finished run keeps no resume point"

    # --forcerun: the whole schedule again (same seed on the CPU: the same weights).
    since = time.time()
    run.snakemake("--forcerun", "pretrain", target="pretrain/mofo/s0/checkpoint.pt")
    assert_trained_from_step_zero(pre_dir, pre_log, since, steps)
    assert same_weights(first, weights(pre_dir / "checkpoint.pt"))

    # New boxes: mofo pretraining reruns from step 0 and learns something else.
    since = time.time()
    boxes = run.overlay("boxes", {"motion_boxes": {"rel_max_threshold": 0.2, "blur_sigma": 5.0}})
    run.snakemake(overlays=(boxes,))
    assert_trained_from_step_zero(pre_dir, pre_log, since, steps)
    assert not same_weights(first, weights(pre_dir / "checkpoint.pt"))
    assert_trained_from_step_zero(ft_dir, ft_log, since, steps)

    # Fine-tuning augmentation: fine-tuning from step 0, pretraining untouched.
    pre_mtime = (pre_dir / "checkpoint.pt").stat().st_mtime_ns
    since = time.time()
    run.snakemake(overlays=(boxes, run.overlay("aug", {"augment": {"random_erasing": 0.25}})))
    assert_trained_from_step_zero(ft_dir, ft_log, since, steps)
    assert (pre_dir / "checkpoint.pt").stat().st_mtime_ns == pre_mtime
