"""Start a training stage in this process or as ``torchrun`` workers (``engine.nproc_per_node``).

The Snakemake scripts call :func:`run_stage`. With ``nproc_per_node: 1`` (or when this process
already is one rank of a job that srun/torchrun started) the stage runs in-process; otherwise
the resolved config is written to ``<out>/run_config.yaml`` and::

    python -m torch.distributed.run --standalone --nproc-per-node=N -m mofo.training.<stage> ...

is started. SIGUSR1/SIGTERM received by this process are forwarded to torchrun as SIGTERM
(torchrun passes SIGTERM to its workers, which checkpoint and stop); a worker that stopped
for a requeue leaves ``<out>/requeue.json`` and this process then exits with
``REQUEUE_EXIT_CODE`` (torchrun itself reports every failure as exit code 1).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mofo.training.distributed import rank_info
from mofo.training.engine import REQUEUE_EXIT_CODE, REQUEUE_MARKER

STAGE_MODULES = {
    "pretrain": "mofo.training.pretrain",
    "finetune": "mofo.training.finetune",
}


def stage_args(stage: str, manifest_path: str | Path, results_dir: str | Path,
               out_dir: str | Path, config_file: str | Path, **kwargs: Any) -> list[str]:
    """The module's command-line arguments for ``stage`` (pretrain: ``masking``; finetune:
    ``pretrained_ckpt``, ``head``)."""
    args = ["--config", str(config_file), "--manifest", str(manifest_path),
            "--results-dir", str(results_dir), "--out", str(out_dir)]
    if stage == "pretrain":
        args += ["--masking", kwargs["masking"]]
    elif stage == "finetune":
        if kwargs.get("pretrained_ckpt"):
            args += ["--pretrained", str(kwargs["pretrained_ckpt"])]
        args += ["--head", kwargs["head"]]
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGE_MODULES)}")
    return args


def torchrun_command(config: dict, stage: str, args: list[str],
                     nproc: int | None = None) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N -m <module> args``."""
    nproc = int(nproc or config["engine"]["nproc_per_node"])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", STAGE_MODULES[stage], *args]


def run_stage(stage: str, config: dict, manifest_path: str | Path, results_dir: str | Path,
              out_dir: str | Path, **kwargs: Any) -> Path:
    """Run ``pretrain`` / ``finetune`` and return the final checkpoint path."""
    out_dir = Path(out_dir)
    nproc = int(config["engine"]["nproc_per_node"])
    if nproc == 1 or rank_info().world_size > 1:
        if stage == "pretrain":
            from mofo.training.pretrain import run
        else:
            from mofo.training.finetune import run
        return run(config, manifest_path, results_dir, out_dir=out_dir, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "run_config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = torchrun_command(config, stage, stage_args(stage, manifest_path, results_dir, out_dir,
                                                     config_file, **kwargs), nproc)
    print("[mofo] " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)

    def forward(_signum: int, _frame: Any) -> None:
        proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc != 0:
        if (out_dir / REQUEUE_MARKER).exists():
            raise SystemExit(REQUEUE_EXIT_CODE)
        raise RuntimeError(f"{stage} failed with exit code {rc}: {' '.join(cmd)}")
    return out_dir / "checkpoint.pt"
