"""Forced reruns of a training stage start from step 0; retries of an interrupted one resume.

``checkpoint-last.pt`` is resumed when it belongs to the same run (same provenance hash,
:mod:`mofo.training.engine`). That alone would also resume it when the user asked Snakemake
to *redo* the job (``--forcerun`` / ``-R``, ``--force`` / ``-f`` on its output, ``--forceall``
/ ``-F``) after a preemption, which docs/RERUNS.md ("When training restarts and when it
resumes") promises trains from step 0. So:

* The main Snakemake process learns what this invocation forces from its DAG settings in the
  ``onstart`` hook (at parse time they are not set yet; hooks run in the main process only,
  job processes get ``--no-hooks``) and exports :data:`FORCED_ENV`: the forced rules / files
  and a fresh invocation id. Jobs inherit it (local jobs are child processes; SLURM jobs get
  the submitting environment, ``sbatch --export=ALL``). It is deliberately not a rule
  ``params`` value: params are rerun triggers, so a value that differs on a forced run would
  make the next, unforced invocation rerun the job once more.
* The job of a forced stage (:func:`discard_if_forced`, before the stage starts) deletes
  ``checkpoint-last.pt`` unless ``<out_dir>/forced-run.json`` holds this invocation's id,
  then writes it. Thus the first attempt of a forced job trains from step 0, while a retry of
  an interrupted attempt within the same invocation (profile ``retries``, a SLURM requeue of
  the same job) finds its own id and resumes. The id, not an attempt number, tells the two
  apart: a SLURM requeue repeats attempt 1, and the next invocation is a new id.

Without the variable (a stage started by hand, or ``snakemake --no-hooks``) nothing is
discarded and the provenance hash alone decides. Imports no torch: it runs in the main
Snakemake process and in the job process that launches the stage.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mofo.paths import LAST_CHECKPOINT

FORCED_ENV = "MOFO_FORCED_JOBS"
FORCED_MARKER = "forced-run.json"


def forced_environment(dag_settings: Any) -> dict[str, str]:
    """``{FORCED_ENV: json}`` for the main process to export in ``onstart``.

    ``dag_settings`` is Snakemake's ``workflow.dag_settings`` (``forceall``, ``forcerun``,
    ``forcetargets``, ``targets``). The value holds ``invocation`` (a new id per call),
    ``all`` (``--forceall``) and ``names``: every forced rule name or file, files made
    absolute (the main process runs in the working directory, as the jobs do). A name is
    matched both as a rule and as a file, so it need not be told which it is.
    """
    names = set(dag_settings.forcerun or ())
    if dag_settings.forcetargets:
        names |= set(dag_settings.targets or ())
    spec = {
        "invocation": uuid.uuid4().hex,
        "all": bool(dag_settings.forceall),
        "names": sorted(names | {os.path.abspath(n) for n in names}),
    }
    return {FORCED_ENV: json.dumps(spec)}


def forced_invocation(rule: str, outputs: Iterable[str],
                      environ: Mapping[str, str] = os.environ) -> str | None:
    """The invocation id when this job (``rule`` with ``outputs``) is forced, else None."""
    raw = environ.get(FORCED_ENV)
    if not raw:
        return None
    spec = json.loads(raw)
    names = set(spec.get("names", ()))
    files = {os.path.abspath(str(out)) for out in outputs}
    if spec.get("all") or rule in names or files & names:
        return str(spec["invocation"])
    return None


def discard_if_forced(rule: str, outputs: Iterable[str], out_dir: str | Path,
                      environ: Mapping[str, str] = os.environ) -> bool:
    """Before a training stage starts: when Snakemake forced this job and this is the job's
    first attempt in this invocation, delete ``<out_dir>/checkpoint-last.pt`` (the stage then
    trains from step 0) and record the invocation in ``<out_dir>/forced-run.json``. Returns
    whether a checkpoint was deleted. Not forced, or a retry in the same invocation: nothing
    changes (the stage resumes when the provenance matches)."""
    invocation = forced_invocation(rule, outputs, environ)
    if invocation is None:
        return False
    out_dir = Path(out_dir)
    marker = out_dir / FORCED_MARKER
    try:
        if json.loads(marker.read_text()).get("invocation") == invocation:
            return False  # a retry of this forced job in this invocation: resume
    except (OSError, ValueError, AttributeError):
        pass
    last = out_dir / LAST_CHECKPOINT
    discarded = last.exists()
    last.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps({"invocation": invocation}))
    os.replace(tmp, marker)
    if discarded:
        print(f"[mofo] {rule}: Snakemake forced this job; {last} of an earlier run deleted, "
              f"training from step 0", file=sys.stderr, flush=True)
    return discarded
