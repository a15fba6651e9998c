"""Running the real mofo pipeline on the tiny CI config (.test/config/tiny.yaml) in a temp dir.

Shared by the ``slurm`` and ``mlflow`` integration tests. Each run gets its own working
directory (so runs never share ``.snakemake`` locks or results) with ``config/`` linked to the
repository's, because the Snakefile's ``configfile:`` is read relative to the working directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mofo.config import REPO_ROOT

SNAKEFILE = REPO_ROOT / "Snakefile"
TINY = REPO_ROOT / ".test" / "config" / "tiny.yaml"
#: Every rule that becomes a job (``all`` and ``motion`` are targets run in Snakemake itself).
PIPELINE_RULES = {
    "demo_data",
    "manifest",
    "decode",
    "optical_flow",
    "motion_map",
    "motion_boxes",
    "motion_pictures",
    "box_quality",
    "trajectories",
    "pretrain",
    "finetune",
    "evaluate",
    "features",
    "probe",
    "table",
}
TRACKING_VARS = (
    "MLFLOW_TRACKING_URI",
    "MOFO_MLFLOW_PARENT_RUN_ID",
    "MOFO_INVOCATION_ID",
    "MOFO_MLFLOW_STAGE_RUN_ID",
)


def workdir(path: Path) -> Path:
    """A fresh working directory for the pipeline with ``config/`` linked in."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config").symlink_to(REPO_ROOT / "config")
    return path


def private_copy(work: Path, dest: Path) -> Path:
    """A copy of the finished pipeline directory ``work`` (the session's ``tiny_local_pipeline``)
    at ``dest``, for a test that runs Snakemake on it: the shared directory stays read-only.
    ``symlinks=True`` keeps ``config/`` a link to the repository's; copy2 keeps the mtimes and
    ``.snakemake/`` (metadata) comes along, so Snakemake sees the same up-to-date outputs and
    reruns only what the test changes. Every path in the results is relative to the working
    directory (``results/``, ``data/demo``), so the copy reads and writes only its own files."""
    shutil.copytree(work, dest, symlinks=True)
    return dest


def args(work: Path, *configfiles: Path) -> list[str]:
    """Snakefile, working directory and the tiny config (plus more overlays)."""
    return [
        "-s",
        str(SNAKEFILE),
        "-d",
        str(work),
        "--configfile",
        str(TINY),
        *map(str, configfiles),
    ]


def env(**extra: str) -> dict[str, str]:
    """This process's environment without tracking variables leaking in, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if k not in TRACKING_VARS}
    base.update(extra)
    return base


def run_local(
    work: Path, timeout: int = 900, cores: int = 2, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``snakemake --cores N`` on the tiny config, under ``timeout -s INT``."""
    cmd = [
        "timeout",
        "-s",
        "INT",
        str(timeout),
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(cores),
        *args(work),
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env(**(extra_env or {})), check=False
    )
