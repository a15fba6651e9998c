"""Run a training-side stage module as its own process (one, or several under torchrun).

The Snakemake scripts for pretrain / finetune / evaluate call :func:`run_stage_module`. The
stage always runs as ``python -m <module>`` in a child process so that one process and
``torchrun --standalone --nproc-per-node=N`` (several GPUs of one SLURM job, or CPU DDP) take
exactly the same path. The effective configuration is written beside the stage's outputs
(``<out_dir>/config.yaml``): it is what the stage read, kept for provenance.

Stopping for a requeue: SIGUSR1 / SIGTERM received by this process are passed on to the stage
as SIGTERM (torchrun hands SIGTERM to its workers), which checkpoint and exit with
``REQUEUE_EXIT_CODE``. torchrun reports every failed worker as exit code 1, so a stage that
leaves ``<out_dir>/requeue.json`` behind is also read as a requeue.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from mofo.training.requeue import REQUEUE_EXIT_CODE, REQUEUE_MARKER


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message names the stage and its log."""


# Inside an srun task of a several-node job: the first host of the allocation is the
# rendezvous address (Snakemake's job step strips SLURM's allocation variables from the rule's
# environment, but srun sets them again in each task), and the port is fixed per job.
_SRUN_RENDEZVOUS = (
    'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" '
    'MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"; exec "$@"'
)


def stage_command(module: str, args: Sequence[str], nproc: int, nodes: int = 1) -> list[str]:
    """``python -m module args``; for nproc > 1 the same under torchrun on this node; for
    nodes > 1 one process per task with srun (nproc tasks per node), ranks from SLURM."""
    if nodes > 1:
        launcher = [
            "srun", f"--nodes={nodes}", f"--ntasks-per-node={max(nproc, 1)}", "--kill-on-bad-exit=1",
            "bash", "-c", _SRUN_RENDEZVOUS, "mofo-stage", sys.executable,
        ]
    elif nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:
        launcher = [sys.executable]
    return [*launcher, "-m", module, *args]


def write_stage_config(config: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def with_job_threads(config: dict, threads: int | None, nproc: int = 1) -> dict:
    """The config with ``engine.cpu_threads`` = the job's threads split over its processes,
    when the config leaves it at 0 (torch would otherwise start one thread per core of the
    machine in every job, however many jobs Snakemake runs side by side)."""
    engine = config["engine"]
    if not threads or int(engine["cpu_threads"]) > 0:
        return config
    return {**config, "engine": {**engine, "cpu_threads": max(1, int(threads) // max(nproc, 1))}}


def run_stage_module(
    module: str, args: Sequence[str], config: dict, out_dir: str | Path, nproc: int = 1, nodes: int = 1,
    threads: int | None = None,
) -> None:
    """Run ``module`` with the effective config; its output goes to this process's stdout/stderr
    (the job log). ``threads``: the job's CPU threads (see :func:`with_job_threads`). Raises
    StageFailed with the exit code on failure."""
    config = with_job_threads(config, threads, nproc)

    config_path = write_stage_config(config, out_dir)
    cmd = stage_command(module, ["--config", str(config_path), *args], nproc, nodes)
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    sys.stdout.flush()
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=sys.stdout, stderr=sys.stderr)

    def forward(_signum, _frame) -> None:
        proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    marker = Path(out_dir) / REQUEUE_MARKER
    if code != 0 and marker.exists() and marker.stat().st_mtime >= started:
        code = REQUEUE_EXIT_CODE  # torchrun's exit 1 for a worker that stopped for a requeue
    if code == REQUEUE_EXIT_CODE:
        # Stopped by SLURM's warning signal after writing checkpoint-last.pt: exit with the
        # same code so the job (and its MLflow run) reads as preempted; a rerun resumes.
        print(f"{module} checkpointed and stopped for requeue (exit {code}); rerun to resume", file=sys.stderr)
        raise SystemExit(code)
    if code != 0:
        raise StageFailed(f"{module} exited with code {code} (output dir {out_dir}); see the log above")
