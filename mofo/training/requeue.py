"""How a training stage that stopped for a requeue tells its parent process.

Kept apart from :mod:`mofo.training.engine` (which imports torch and timm, ~5 s) so that the
Snakemake job process that launches the stage (:func:`mofo.stages.run_stage_module`) can read
these without importing either.
"""

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" -- a requeued
# SLURM job (or a Snakemake retry) that sees it resumes from checkpoint-last.pt.
REQUEUE_EXIT_CODE = 75
# Written next to the checkpoint when a run stops for a requeue, so a parent process that
# only sees torchrun's generic exit code 1 can tell (``mofo.stages``).
REQUEUE_MARKER = "requeue.json"
