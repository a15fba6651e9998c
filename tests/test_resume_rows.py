"""docs/RERUNS.md's table "When training restarts and when it resumes", one test per row, each
starting from a real interrupted run.

The interruption is real: a tiny Snakemake run of fine-tuning gets SIGUSR1 (what SLURM's
``--signal=USR1@<lead>`` delivers) while it trains, writes ``checkpoint-last.pt`` mid-run and
exits with the requeue code 75, so Snakemake sees a failed job -- the state a preempted job
leaves behind. Fine-tuning runs ``EPOCHS`` epochs here (an overlay on the tiny config) so
that the signal lands well before the end. Every Snakemake call runs in this module's own
working directory (its own ``.snakemake/``: a copy of the session's tiny pipeline); the tests
share it and each starts by interrupting fine-tuning itself, so they do not depend on their
order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.cluster.pipeline import args as pipeline_args
from tests.cluster.pipeline import private_copy
from tests.test_reruns import assert_trained_from_step_zero

pytestmark = pytest.mark.slow

STAGE = "finetune/mofo-mean/s0"
EPOCHS = 20
STEPS = EPOCHS * (12 // 4)  # tiny: 12 training clips in batches of 4
SIGNAL_AFTER_STEP = 2


class Pipeline:
    """One tiny results folder, its own working directory, and Snakemake calls on it."""

    def __init__(self, root: Path):
        self.root = root
        self.res = root / "results" / "demo"
        self.stage_dir = self.res / STAGE
        self.log = self.res / "logs" / "finetune" / "mofo-mean-s0.log"
        self.target = self.stage_dir / "checkpoint.pt"
        self.target_arg = f"results/demo/{STAGE}/checkpoint.pt"  # as the rule names it
        # The layout of the copied tiny pipeline (results/, data/demo: the config's defaults,
        # relative to this working directory), without tracking.
        self.base = [self.overlay("paths", {"tracking": {"mlflow": {"enabled": False}}}),
                     self.overlay("long", {"finetune": {"epochs": EPOCHS}})]

    def overlay(self, name: str, content: dict) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(content))
        return path

    def command(self, args: tuple[str, ...], overlays: tuple[Path, ...]) -> list[str]:
        # The tiny pipeline's own command line (config/ is linked in the working directory,
        # the overlays come after the tiny config): the same config, keys in the same order,
        # so Snakemake sees the copied outputs' params unchanged.
        return [sys.executable, "-m", "snakemake", "--nolock", "--cores", "2", self.target_arg,
                *args, *pipeline_args(self.root, *self.base, *overlays)]

    @staticmethod
    def env() -> dict[str, str]:
        """This process's environment without anything a Snakemake run exported to jobs."""
        return {k: v for k, v in os.environ.items() if not k.startswith("MOFO_")}

    def snakemake(self, *args: str, overlays: tuple[Path, ...] = ()) -> None:
        result = subprocess.run(self.command(args, overlays), cwd=self.root, env=self.env(),
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def steps(self, since: float = 0.0) -> list[int]:
        """The ``step`` records of metrics.jsonl written at or after ``since`` (whole lines)."""
        path = self.stage_dir / "metrics.jsonl"
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines()[: text.count("\n")]
        records = [json.loads(line) for line in lines]
        return [r["step"] for r in records if r["type"] == "step" and r["time"] >= since]

    def preempt(self, *args: str, overlays: tuple[Path, ...] = ()) -> tuple[int, float, float]:
        """Start fine-tuning from step 0 under Snakemake (``--forcerun finetune`` + ``args``),
        send SIGUSR1 to the stage process once step ``SIGNAL_AFTER_STEP`` is logged, wait for
        Snakemake to end; ``(its exit code, the time it started, the time of the signal)``."""
        (self.stage_dir / "checkpoint-last.pt").unlink(missing_ok=True)
        since = time.time()
        with open(self.root / "preempt.out", "w") as out:
            proc = subprocess.Popen(self.command(("--forcerun", "finetune", *args), overlays),
                                    cwd=self.root, env=self.env(), stdout=out, stderr=out)
            try:
                deadline = time.time() + 600
                while not any(s >= SIGNAL_AFTER_STEP for s in self.steps(since)):
                    assert proc.poll() is None, (self.root / "preempt.out").read_text()[-3000:]
                    assert time.time() < deadline, "fine-tuning never reached its second step"
                    time.sleep(0.01)
                os.kill(stage_pid(self.stage_dir), signal.SIGUSR1)
                signalled = time.time()
                return proc.wait(timeout=600), since, signalled
            finally:
                if proc.poll() is None:
                    proc.kill()


def stage_pid(out_dir: Path) -> int:
    """The process id of the fine-tuning stage writing to ``out_dir`` (from /proc: its
    ``--out`` names the folder relative to the process's working directory)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if b"mofo.training.finetune" in argv and any(
                cwd / os.fsdecode(arg) == out_dir for arg in argv if arg):
            return int(entry.name)
    raise AssertionError(f"no fine-tuning process for {out_dir}")


def interrupted_at(p: Pipeline, since: float) -> int:
    """Check the state a preempted job leaves and return the step it checkpointed at."""
    steps = p.steps(since)
    assert not p.target.exists()
    assert (p.stage_dir / "checkpoint-last.pt").exists()
    assert steps == list(range(1, len(steps) + 1)) and SIGNAL_AFTER_STEP <= steps[-1] < STEPS, steps
    assert "stopped for requeue (exit 75)" in p.log.read_text()
    return steps[-1]


def assert_resumed(p: Pipeline, at: int, since: float) -> None:
    """The run resumed at step ``at`` of the interrupted run: the steps before it are the
    interrupted run's records, the ones after it new, every step once, and the log says so."""
    assert p.steps() == list(range(1, STEPS + 1)), p.steps()
    assert p.steps(since) == list(range(at + 1, STEPS + 1)), p.steps(since)
    last = p.stage_dir.relative_to(p.root) / "checkpoint-last.pt"  # results/ is relative
    assert f"resuming from {last} at epoch" in p.log.read_text()
    assert f"step {at}" in p.log.read_text()
    assert p.target.exists() and not (p.stage_dir / "checkpoint-last.pt").exists()


@pytest.fixture(scope="module")
def pipeline(tiny_local_pipeline, tmp_path_factory) -> Pipeline:
    """The tiny demo's motion chain, `mofo` pretraining and `mofo-mean` fine-tuning: a private
    copy of the session's tiny pipeline, where the longer fine-tuning (``EPOCHS``) is the only
    job that runs (checked)."""
    p = Pipeline(private_copy(tiny_local_pipeline, tmp_path_factory.mktemp("resume-rows") / "work"))
    since = time.time()
    p.snakemake()
    assert p.steps(since) == list(range(1, STEPS + 1))  # the fine-tuning ran, in full
    assert all(path.stat().st_mtime < since for path in (
        p.res / "pretrain" / "mofo" / "s0" / "checkpoint.pt", p.res / "manifest.csv",
        *(p.res / "boxes").glob("*.csv"))), "more than the fine-tuning ran again"
    return p


def test_preempted_job_retried_in_the_same_invocation_resumes(pipeline: Pipeline):
    """SLURM retry (profile ``retries: 1``): the retry of an interrupted attempt resumes, also
    when the invocation forced the job (only its first attempt starts from step 0)."""
    code, since, signalled = pipeline.preempt("--retries", "1")
    assert code == 0, (pipeline.root / "preempt.out").read_text()[-3000:]
    assert pipeline.steps(since) == list(range(1, STEPS + 1)), pipeline.steps(since)
    # The first attempt's records (written before the signal) are kept: the retry resumed.
    before = [s for s in pipeline.steps(since) if s not in pipeline.steps(signalled)]
    assert before == list(range(1, len(before) + 1)) and len(before) >= SIGNAL_AFTER_STEP, before
    assert "resuming from" in pipeline.log.read_text(), pipeline.log.read_text()[-2000:]
    assert pipeline.target.exists() and not (pipeline.stage_dir / "checkpoint-last.pt").exists()


def test_preempted_job_rerun_by_the_next_invocation_resumes(pipeline: Pipeline):
    """``--rerun-incomplete`` (or a plain rerun) after a preemption: resumes."""
    code, since, _ = pipeline.preempt()
    assert code != 0
    at = interrupted_at(pipeline, since)
    since = time.time()
    pipeline.snakemake("--rerun-incomplete")
    assert_resumed(pipeline, at, since)


def rerun_after_preemption(pipeline: Pipeline, *args: str,
                           overlays: tuple[Path, ...] = ()) -> float:
    """Preempt a fine-tuning mid-run, then run Snakemake again with ``args`` / ``overlays``;
    the time the second run started (its records are newer)."""
    code, since, _ = pipeline.preempt()
    assert code != 0
    interrupted_at(pipeline, since)
    since = time.time()
    pipeline.snakemake(*args, overlays=overlays)
    return since


@pytest.mark.parametrize("force", [
    ("--forcerun", "finetune"), ("-R", "finetune"), ("-R", "<target>"), ("--force",),
], ids=["forcerun-rule", "R-rule", "R-file", "force-target"])
def test_preempted_job_forced_trains_from_step_zero(pipeline: Pipeline, force: tuple[str, ...]):
    since = rerun_after_preemption(
        pipeline, *(pipeline.target_arg if a == "<target>" else a for a in force))
    assert_trained_from_step_zero(pipeline.stage_dir, pipeline.log, since, STEPS)


def test_preempted_job_with_a_changed_setting_trains_from_step_zero(pipeline: Pipeline):
    since = rerun_after_preemption(
        pipeline, overlays=(pipeline.overlay("aug", {"augment": {"random_erasing": 0.5}}),))
    assert_trained_from_step_zero(pipeline.stage_dir, pipeline.log, since, STEPS)
    assert "belongs to another run (changed: settings: augment)" in pipeline.log.read_text()


def test_finished_job_forced_trains_from_step_zero(pipeline: Pipeline):
    code, since, _ = pipeline.preempt()
    assert code != 0
    at = interrupted_at(pipeline, since)
    since = time.time()
    pipeline.snakemake()
    assert_resumed(pipeline, at, since)  # finished now, after resuming
    since = time.time()
    pipeline.snakemake("--forcerun", "finetune")
    assert_trained_from_step_zero(pipeline.stage_dir, pipeline.log, since, STEPS)


def test_resume_false_trains_from_step_zero(pipeline: Pipeline):
    since = rerun_after_preemption(
        pipeline, overlays=(pipeline.overlay("noresume", {"engine": {"resume": False}}),))
    assert_trained_from_step_zero(pipeline.stage_dir, pipeline.log, since, STEPS)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(pipeline: Pipeline):
    """On the CPU the resumed run reproduces the uninterrupted run (same seed) exactly."""
    pipeline.snakemake("--forcerun", "finetune")
    reference = torch.load(pipeline.target, map_location="cpu", weights_only=True)["model"]
    code, since, _ = pipeline.preempt()
    assert code != 0
    interrupted_at(pipeline, since)
    pipeline.snakemake()
    resumed = torch.load(pipeline.target, map_location="cpu", weights_only=True)["model"]
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
