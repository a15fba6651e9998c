"""A working directory of its own for each Snakemake run that a test starts.

Snakemake keeps its state (``.snakemake/``: metadata, locks, incomplete markers, logs) in its
working directory; runs that all used the repository would share it, and one test's leftovers
could change what the next one sees. So each run gets a fresh directory, with the Snakefile
named by path (``-s``) and ``config/`` linked to the repository's (the Snakefile's
``configfile:`` is relative to the working directory).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAKEFILE = ROOT / "Snakefile"


def snakemake_workdir(base: Path | None = None) -> Path:
    """A new empty working directory (under ``base``, else the system's temp folder) whose
    ``config/`` links to the repository's."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="smk-work-", dir=base))
    (work / "config").symlink_to(ROOT / "config")
    return work


def snakemake_cmd(work: Path, *args: str) -> list[str]:
    """``python -m snakemake -s <repo>/Snakefile -d <work> --nolock <args>``."""
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(work), "--nolock",
            *args]


def run_snakemake(*args: str, timeout: int = 900, base: Path | None = None,
                  **kwargs) -> subprocess.CompletedProcess:
    """Run Snakemake in a fresh working directory (see :func:`snakemake_workdir`); without
    ``base`` the directory is removed afterwards (pass absolute paths for what is kept)."""
    work = snakemake_workdir(base)
    try:
        return subprocess.run(snakemake_cmd(work, *args), cwd=work, capture_output=True,
                              text=True, timeout=timeout, check=False, **kwargs)
    finally:
        if base is None:
            shutil.rmtree(work, ignore_errors=True)
