"""A training recipe's global batch, turned into what each process runs.

A recipe states the **total batch** (clips per optimizer step, ``total_batch`` of the
``pretrain`` / ``finetune`` section) and its learning rates per 256 clips; VideoMAE's SSV2
recipe is 32 clips x 64 GPUs = 2048 for pretraining and 8 x 64 = 512 for fine-tuning. How many
processes (GPUs) a job gets is a fact of the launch, not of the recipe, so the per-process
micro-batch and the gradient-accumulation steps are derived here:

    total_batch = per_process x processes x accum_steps

``batch_size`` of the section is the most clips one process runs in one forward/backward (its
memory limit; the recipe's per-GPU batch). ``accum_steps: auto`` takes the fewest accumulation
steps that meet ``total_batch`` exactly with at most ``batch_size`` clips per process; an
integer pins it. When no split meets the total exactly (e.g. 2048 clips on 3 GPUs), the
nearest one is used and :attr:`BatchPlan.exact` is False: the run says so at start-up, in its
MLflow params and in the table, never silently.

The learning rates follow VideoMAE's ``run_mae_pretraining.py`` / ``run_class_finetuning.py``:
``lr``, ``min_lr`` and ``warmup_lr`` are all ``<value> x total / 256``, with the total batch
counting gradient accumulation (VideoMAE's ``update_freq``). This module imports nothing heavy:
the Snakefile and ``mofo config`` use it to show the plan before anything runs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

LR_REFERENCE_BATCH = 256  # every lr of a stage section is quoted per this many clips


def scaled_lr(value: float, total_batch: int) -> float:
    """The linear scaling rule: an lr quoted per 256 clips at ``total_batch`` clips."""
    return float(value) * total_batch / LR_REFERENCE_BATCH


@dataclass(frozen=True)
class BatchPlan:
    """How one training stage meets its total batch on ``processes`` processes."""

    recipe_total: int  # the section's total_batch
    processes: int  # training processes (GPUs) of the job, all nodes
    per_process: int  # clips per process and micro-batch
    accum_steps: int  # micro-batches per optimizer step
    lr: float  # peak lr: base_lr x total / 256
    min_lr: float  # cosine floor: min_lr x total / 256
    warmup_lr: float  # lr at the first step: warmup_lr x total / 256

    @property
    def total(self) -> int:
        """Clips per optimizer step as run."""
        return self.per_process * self.processes * self.accum_steps

    @property
    def exact(self) -> bool:
        return self.total == self.recipe_total

    def as_dict(self) -> dict[str, float | int | bool]:
        """Every field plus ``total_batch`` (as run) and ``exact``: checkpoint ``meta["batch"]``,
        the MLflow params (prefixed by the stage) and the table's columns."""
        return {**asdict(self), "total_batch": self.total, "exact": self.exact}

    def describe(self, stage: str) -> str:
        """One line for logs and ``mofo config``; starts with WARNING when inexact."""
        line = (f"{stage}: total batch {self.total} = {self.per_process} clips x "
                f"{self.processes} process{'es' if self.processes > 1 else ''} x "
                f"{self.accum_steps} accumulation step{'s' if self.accum_steps > 1 else ''}; "
                f"lr {self.lr:.3g} (floor {self.min_lr:.3g}, warm-up from {self.warmup_lr:.3g})")
        if self.exact:
            return line
        return (f"WARNING {line} -- NOT the configured total_batch {self.recipe_total}: "
                f"{self.recipe_total} clips cannot be split evenly over {self.processes} "
                f"processes with at most the configured batch_size per process; the lrs are "
                f"scaled to the batch actually run")


def _split(total: int, processes: int, max_per_process: int, accum: int | None) -> tuple[int, int]:
    """``(per_process, accum_steps)``: exact when possible, else the nearest total."""
    if accum is not None:
        return max(1, round(total / (processes * accum))), accum
    fewest = max(1, math.ceil(total / (processes * max_per_process)))
    for steps in range(fewest, max(fewest, total // processes) + 1):
        if total % (processes * steps) == 0:
            return total // (processes * steps), steps
    return max(1, min(max_per_process, round(total / (processes * fewest)))), fewest


def plan_batch(stage_cfg: dict, processes: int) -> BatchPlan:
    """The :class:`BatchPlan` of a ``pretrain`` / ``finetune`` section on ``processes``.

    Reads ``total_batch``, ``batch_size`` (the per-process maximum), ``accum_steps``
    (``"auto"`` or an int), ``base_lr``, ``min_lr`` and ``warmup_lr``. Raises ValueError
    naming the key when a pinned ``accum_steps`` would need more than ``batch_size`` clips
    per process.
    """
    total, most = int(stage_cfg["total_batch"]), int(stage_cfg["batch_size"])
    processes = max(1, int(processes))
    accum_cfg = stage_cfg["accum_steps"]
    accum = None if accum_cfg == "auto" else int(accum_cfg)
    per, steps = _split(total, processes, most, accum)
    if per > most:
        raise ValueError(
            f"accum_steps {accum} on {processes} processes needs {per} clips per process for "
            f"total_batch {total}, more than batch_size {most}: raise accum_steps or set it "
            f"to auto")
    run_total = per * processes * steps
    return BatchPlan(recipe_total=total, processes=processes, per_process=per,
                     accum_steps=steps, lr=scaled_lr(stage_cfg["base_lr"], run_total),
                     min_lr=scaled_lr(stage_cfg["min_lr"], run_total),
                     warmup_lr=scaled_lr(stage_cfg["warmup_lr"], run_total))


def planned_stage(stage_cfg: dict, processes: int, stage: str, announce: bool) -> tuple[dict, BatchPlan]:
    """``(stage_cfg with batch_size / accum_steps as the plan runs them, plan)``: what the
    loader and the engine read. ``announce``: print :meth:`BatchPlan.describe` to stderr
    (rank 0), so every job log says which batch and lrs it trained with."""
    plan = plan_batch(stage_cfg, processes)
    if announce:
        print(f"[mofo] {plan.describe(stage)}", file=sys.stderr, flush=True)
    return {**stage_cfg, "batch_size": plan.per_process, "accum_steps": plan.accum_steps}, plan


TRAINING_STAGES = ("pretrain", "finetune")  # the config sections (and rules) with a total batch


def processes_per_node(resources: dict, nproc_per_node: int) -> int:
    """Training processes per node of a job from its resources: ``tasks_per_node``
    (several-node jobs, one task per GPU), else one per GPU (``gpu``, SLURM profile), else
    ``engine.nproc_per_node`` (CPU DDP). More than one on one node means torchrun inside
    the job (mofo/stages.py)."""
    return max(int(resources.get("tasks_per_node") or 0), int(resources.get("gpu") or 0),
               int(nproc_per_node))


def job_processes(resources: dict, nproc_per_node: int) -> int:
    """All training processes of a job: :func:`processes_per_node` x ``nodes``."""
    return processes_per_node(resources, nproc_per_node) * max(1, int(resources.get("nodes") or 1))


def describe_plans(config: dict, resources_by_stage: dict[str, dict]) -> list[str]:
    """One :meth:`BatchPlan.describe` line per training stage, for the processes its rule's
    resources give (``{"pretrain": {"gpu": 8}, ...}``; a stage absent = a local job)."""
    nproc = int(config["engine"]["nproc_per_node"])
    return [plan_batch(config[stage], job_processes(resources_by_stage.get(stage, {}), nproc))
            .describe(stage) for stage in TRAINING_STAGES]
