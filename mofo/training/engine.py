"""The one training loop behind pretraining and fine-tuning.

It runs unchanged as one CPU/GPU process, under ``torchrun`` / ``srun`` (DDP: gloo on CPU,
nccl on GPU) and under DeepSpeed (``engine.kind: deepspeed``). A stage supplies a *task*:
``task(model, batch) -> (loss, extras)``; the engine does everything else:

- optimizer (timm AdamW) and per-iteration cosine schedule (``mofo.training.optim``);
- gradient accumulation (``accum_steps`` = k of the stage section): one optimizer step is k
  micro-batches of ``batch_size`` clips per process, each loss scaled by 1/k, so the step's
  gradient is the mean over ``batch_size x processes x k`` clips -- the effective batch that
  the lr scaling (``base_lr x effective batch / 256``) uses. DDP all-reduces the gradients
  only on the k-th backward (``no_sync`` on the others); DeepSpeed gets
  ``gradient_accumulation_steps: k``. An epoch has ``len(loader) // k`` optimizer steps (the
  last ``len(loader) % k`` micro-batches are not drawn). ``step`` (the global step of metrics,
  checkpoints, ``max_steps`` and the schedule) counts optimizer steps, and checkpoints are
  written only between two optimizer steps, never inside an accumulation window;
- bf16 autocast on GPU (``engine.precision``), fp32 on CPU; gradient clipping;
- one small all-reduce per optimizer step of ``[loss, non-finite flag, stop flag, clips]``
  (before the last micro-batch's backward) so every
  rank sees the same mean loss, stops together on a NaN/inf loss (``NonFiniteLossError``
  naming the step) and checkpoints together on SIGUSR1/SIGTERM;
- checkpoints (``checkpoint-last.pt``) every ``checkpoint_every`` epochs, at the end, on a
  signal (then exits with ``REQUEUE_EXIT_CODE``) and at ``max_steps``; a restarted run resumes
  from ``checkpoint-last.pt`` at the same step: the epoch's loader is rebuilt from the epoch's
  starting RNG state, the finished batches are drawn and dropped, then the RNG states of the
  step are restored, so a CPU run reproduces the uninterrupted run's losses;
- JSONL metrics (``metrics.jsonl``: ``type`` = ``step`` | ``epoch`` | ``end``, plus the
  ``epoch_end`` hook's records) and an optional ``metrics_callback(record, step)`` hook, on
  rank 0;
- an optional ``epoch_end`` hook (:class:`EpochEnd`) after every epoch: it may stop training
  early and choose the weights of ``checkpoint.pt`` (fine-tuning's ``finetune.selection: best``,
  ``mofo.training.selection``); its state is saved in ``checkpoint-last.pt``.

DeepSpeed note: the forward runs under torch autocast as in the other engines (DeepSpeed's
``torch_autocast`` section, see :func:`mofo.training.wrapping.deepspeed_config`) and
DeepSpeed keeps fp32 weights (no ``bf16`` section), ZeRO stage 0; mofo's own checkpoint format
is used so
that resuming and ``load_pretrained`` work the same whichever engine wrote the file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from mofo.paths import CHECKPOINT, LAST_CHECKPOINT, METRICS_LOG
from mofo.provenance import digest
from mofo.runtime.device import (
    autocast_context,
    seed_everything,
    to_device,
)
from mofo.runtime.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    unwrap,
)
from mofo.runtime.loader import set_loader_epoch
from mofo.training import resume_state as ckpt_io
from mofo.training.metrics_log import MetricsCallback, MetricsLog
from mofo.training.optim import build_optimizer, build_scheduler, current_lr
from mofo.training.requeue import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from mofo.training.wrapping import Wrapped, wrap_model

Task = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]


class EpochEnd(Protocol):
    """The optional ``epoch_end`` hook of :func:`train` (e.g. validation with early stopping,
    ``mofo.training.selection``).

    ``hook(model, epoch)`` runs on every rank after every finished epoch (``model`` as the loop
    calls it: DDP / DeepSpeed / plain) and returns ``(stop, record)``: ``stop`` must be the same
    on every rank (the hook agrees it across ranks) and ends training after this epoch; a
    non-empty ``record`` is written to ``metrics.jsonl`` (its ``type`` set by the hook).
    ``state_dict()`` goes into ``checkpoint-last.pt`` and ``load_state_dict`` gets it back when
    the run resumes; ``final(model)`` gives ``(weights or None = the model's own, meta
    entries)`` for ``checkpoint.pt``.
    """

    def __call__(self, model: nn.Module, epoch: int) -> tuple[bool, dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def final(self, model: nn.Module) -> tuple[dict | None, dict]: ...


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the global step and epoch."""


class RequeueRequested(SystemExit):
    """Raised after the checkpoint written on SIGUSR1/SIGTERM; exits with code 75."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped" (max_steps reached)
    final_checkpoint: Path | None  # checkpoint.pt when finished
    last_checkpoint: Path
    global_step: int
    epoch: int
    losses: list[float] = field(default_factory=list)  # mean loss of every step run here


# --------------------------------------------------------------------------- signals
class StopFlag:
    """Set by SIGUSR1 / SIGTERM (SLURM ``--signal=USR1@...`` before the time limit).

    The handler only sets a flag; the loop checks it once per step, so the checkpoint is
    always written between two optimizer steps.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def install(self) -> StopFlag:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------- helpers
def effective_batch(stage_cfg: dict, world_size: int) -> int:
    """Clips per optimizer step: ``batch_size x processes x accum_steps`` (what the linear
    lr scaling rule is applied to)."""
    return int(stage_cfg["batch_size"]) * world_size * int(stage_cfg["accum_steps"])


def count_batch(batch: Any) -> int:
    """Clips in a batch (first dimension of its ``frames``)."""
    frames = batch["frames"] if isinstance(batch, dict) else batch[0]
    return int(frames.shape[0])


# --------------------------------------------------------------------------- the loop
def _save_last(
    path: Path, wrapped: Wrapped, scheduler: Any, *, epoch: int, step_in_epoch: int,
    global_step: int, epoch_start_rng: dict, hash_: str, provenance: dict, meta: dict,
    ctx: DistContext, epoch_end_state: dict | None = None,
) -> None:
    """Gather every rank's RNG state and write ``checkpoint-last.pt`` from rank 0 (with the
    ``epoch_end`` hook's state, when there is one)."""
    rng_all = all_gather_objects(ckpt_io.capture_rng_state())
    start_all = all_gather_objects(epoch_start_rng)
    if ctx.is_main:
        state = {
            "format": ckpt_io.CHECKPOINT_FORMAT,
            "model": unwrap(wrapped.model).state_dict(),
            "optimizer": wrapped.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "rng": rng_all,
            "epoch_start_rng": start_all,
            "world_size": ctx.world_size,
            "config_hash": hash_,
            "provenance": provenance,
            "meta": meta,
        }
        if epoch_end_state is not None:
            state["epoch_end"] = epoch_end_state
        ckpt_io.atomic_torch_save(state, path)
    barrier()


def _iterate_epoch(
    loader: Any, skip: int, restore_rng: dict | None
) -> Iterator[Any]:
    """The epoch's batches, dropping the first ``skip`` (already trained on) and then
    restoring the step's RNG state -- both at once, before any batch is used, even when no
    batch of the epoch is left (a run stopped at the epoch's last optimizer step)."""
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    if restore_rng is not None:
        ckpt_io.restore_rng_state(restore_rng)
    return iterator


@dataclass
class _StartPoint:
    """Where a run starts: step 0, or the step of a resumable ``checkpoint-last.pt``."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    rng: dict | None = None  # this rank's RNG state at the saved step
    epoch_start_rng: dict | None = None  # ... and at the start of the saved epoch
    epoch_end_state: dict | None = None  # the epoch_end hook's state in the checkpoint


def _provenance_diff(old: dict | None, new: dict) -> str:
    """The top-level entries (settings / input files) that differ, for the log line."""
    if not isinstance(old, dict):
        return "the checkpoint holds no provenance"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            parts.append(f"{key}: {', '.join(sub[:4])}{' ...' if len(sub) > 4 else ''}")
        else:
            parts.append(key)
    return "; ".join(parts) or "none"


def _resume_point(last_path: Path, provenance: dict, hash_: str, wrapped_model: nn.Module,
                  optimizer: Any, scheduler: Any, ctx: DistContext, engine_cfg: dict,
                  stage: str) -> _StartPoint:
    """Load ``checkpoint-last.pt`` into model, optimizer and scheduler when it belongs to this
    very run (same provenance hash: settings and input digests) -- else start at step 0. A job
    Snakemake forced never gets here with an earlier run's checkpoint: its job process deletes
    it first (``mofo.training.restart``). Raises ``UnsafeCheckpointError`` for a checkpoint
    that is not weights-only (``resume_state.load_checkpoint``)."""
    if not bool(engine_cfg["resume"]) or not last_path.exists():
        return _StartPoint()
    ckpt = ckpt_io.load_checkpoint(last_path)
    if ckpt.get("config_hash") != hash_:
        print(f"[mofo] {stage}: {last_path} belongs to another run (changed: "
              f"{_provenance_diff(ckpt.get('provenance'), provenance)}); training from step 0",
              file=sys.stderr)
        return _StartPoint()
    if ckpt.get("world_size") != ctx.world_size:
        raise RuntimeError(
            f"{last_path} was written by {ckpt.get('world_size')} processes, this run has "
            f"{ctx.world_size}; resume with the same number or delete the checkpoint"
        )
    unwrap(wrapped_model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    start = _StartPoint(int(ckpt["epoch"]), int(ckpt["step_in_epoch"]), int(ckpt["global_step"]),
                        ckpt["rng"][ctx.info.rank], ckpt["epoch_start_rng"][ctx.info.rank],
                        ckpt.get("epoch_end"))
    scheduler.step_update(start.global_step)
    if ctx.is_main:
        print(f"[mofo] {stage}: resuming from {last_path} at epoch {start.epoch}, "
              f"step {start.global_step}", file=sys.stderr)
    return start


@dataclass
class _Loop:
    """What one optimisation step needs, gathered once per run."""

    wrapped: Wrapped
    scheduler: Any
    task: Task
    engine_cfg: dict
    ctx: DistContext
    stop: StopFlag
    clip_grad: float
    stage: str
    accum_steps: int


def _sync_context(wrapped: Wrapped, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` on every micro-batch of an accumulation window but the last: the
    gradients add up locally and are all-reduced once, by the last backward."""
    if not last and isinstance(wrapped.model, nn.parallel.DistributedDataParallel):
        return wrapped.model.no_sync()
    return contextlib.nullcontext()


def _backward(wrapped: Wrapped, loss: torch.Tensor, accum_steps: int) -> None:
    """Add this micro-batch's gradient: ``loss / accum_steps`` (DeepSpeed divides by its
    ``gradient_accumulation_steps`` itself and steps only at the window's end)."""
    if wrapped.ds_engine is not None:
        wrapped.ds_engine.backward(loss)
        wrapped.ds_engine.step()
    else:
        (loss / accum_steps).backward()


def _reduce_stats(loop: _Loop, loss_sum: float, bad: bool, clips: int) -> list[float]:
    """``[loss sum, non-finite flag, stop votes, clips]`` summed over ranks."""
    ctx = loop.ctx
    stats = all_reduce_sum(torch.tensor(
        [0.0 if bad else loss_sum, 1.0 if bad else 0.0,
         1.0 if loop.stop.requested else 0.0, float(clips)], dtype=torch.float64,
    ).to(ctx.device if ctx.backend == "nccl" else "cpu"))
    return [float(v) for v in stats.cpu()]


def _step(loop: _Loop, micro_batches: Iterator[Any], global_step: int, epoch: int,
          step_in_epoch: int, steps_per_epoch: int) -> tuple[float, float, bool, dict]:
    """One optimizer step on ``loop.accum_steps`` micro-batches (forward + backward each);
    returns (loss sum, clips, stop requested) summed over the window and the ranks, and the
    task's extras (this rank's, last micro-batch). The ranks' statistics are all-reduced
    before the last backward, so every rank raises NonFiniteLossError (naming the optimizer
    step) on a NaN/inf loss of any micro-batch on any rank, and no update is made."""
    ctx, wrapped, accum = loop.ctx, loop.wrapped, loop.accum_steps
    loss_sum, clips, first_bad, extras = 0.0, 0, None, {}
    for i, batch in enumerate(micro_batches):
        last = i == accum - 1
        batch = to_device(batch, ctx.device)
        with _sync_context(wrapped, last):
            with autocast_context(loop.engine_cfg, ctx.device):
                loss, extras = loop.task(wrapped.model, batch)
            n = count_batch(batch)
            local = float(loss.detach().float().item())
            if not math.isfinite(local):
                first_bad = local if first_bad is None else first_bad
            loss_sum, clips = loss_sum + local * n, clips + n
            if last:
                total, bad, stop_votes, all_clips = _reduce_stats(
                    loop, loss_sum, first_bad is not None, clips)
                if bad > 0:
                    raise NonFiniteLossError(
                        f"{loop.stage}: loss is "
                        f"{first_bad if first_bad is not None else 'non-finite on another rank'}"
                        f" at global step {global_step + 1} (epoch {epoch}, step "
                        f"{step_in_epoch + 1} of {steps_per_epoch}); stopping")
            if first_bad is None:  # a bad micro-batch is not backpropagated (raised above)
                _backward(wrapped, loss, accum)
    if wrapped.ds_engine is None:
        if loop.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(unwrap(wrapped.model).parameters(), loop.clip_grad)
        wrapped.optimizer.step()
        wrapped.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step_update(global_step + 1)
    return total, all_clips, stop_votes > 0, extras


def _requeue(loop: _Loop, marker: Path, last_path: Path, global_step: int) -> RequeueRequested:
    """After the checkpoint of a stop signal: leave the marker, say so, return the exit."""
    if loop.ctx.is_main:
        marker.write_text(json.dumps({"signal": loop.stop.requested, "step": global_step}))
    message = (
        f"{loop.stage}: {loop.stop.requested or 'stop signal on another rank'} received; "
        f"checkpoint written at step {global_step} to {last_path}; exiting "
        f"with code {REQUEUE_EXIT_CODE} so the job is requeued"
    )
    print(f"[mofo] {message}", file=sys.stderr)
    return RequeueRequested(message)


def _finish(model: nn.Module, final_path: Path, last_path: Path, global_step: int, epochs: int,
            hash_: str, provenance: dict, meta: dict, log: MetricsLog, ctx: DistContext,
            stage: str, weights: dict | None = None) -> None:
    """Write ``checkpoint.pt`` (``weights``, by default the model's) and remove
    ``checkpoint-last.pt``: a finished run is never resumed, so a forced or triggered rerun
    trains from step 0."""
    if ctx.is_main:
        ckpt_io.atomic_torch_save(
            {"format": ckpt_io.CHECKPOINT_FORMAT,
             "model": weights if weights is not None else unwrap(model).state_dict(),
             "global_step": global_step, "epoch": epochs, "config_hash": hash_,
             "provenance": provenance, "meta": meta},
            final_path,
        )
        log.write({"type": "end", "stage": stage, "step": global_step, "epoch": epochs},
                  global_step)
        last_path.unlink(missing_ok=True)
    barrier()


def _end_epoch(hook: EpochEnd | None, model: nn.Module, epoch: int, global_step: int,
               log: MetricsLog, ctx: DistContext, stage: str) -> bool:
    """Run the ``epoch_end`` hook after ``epoch``, log its record; whether to stop now."""
    if hook is None:
        return False
    stop, record = hook(model, epoch)
    if record:
        log.write({"type": "epoch_end", "stage": stage, "epoch": epoch, "step": global_step,
                   **record}, global_step)
    if stop and ctx.is_main:
        print(f"[mofo] {stage}: stopping after epoch {epoch} (epoch_end hook)", file=sys.stderr)
    return bool(stop)


def _final_from_hook(hook: EpochEnd | None, model: nn.Module,
                     meta: dict) -> tuple[dict | None, dict]:
    """``(weights, meta)`` of ``checkpoint.pt``: the hook's choice, else the model's own."""
    if hook is None:
        return None, meta
    weights, extra = hook.final(model)
    return weights, {**meta, **extra}


def train(
    model: nn.Module,
    loader: Any,
    task: Task,
    *,
    stage_cfg: dict,
    engine_cfg: dict,
    ctx: DistContext,
    out_dir: str | Path,
    hash_config: dict,
    meta: dict | None = None,
    metrics_callback: MetricsCallback | None = None,
    max_steps: int | None = None,
    stage: str = "train",
    epoch_end: EpochEnd | None = None,
) -> TrainResult:
    """Train ``model`` for ``stage_cfg['epochs']`` epochs of ``loader`` with ``task``.

    ``stage_cfg`` keys used: epochs, warmup_epochs, batch_size, accum_steps, base_lr, min_lr,
    warmup_lr, weight_decay, betas, clip_grad, layer_decay (optional), checkpoint_every,
    log_interval, seed. ``loader`` yields micro-batches; an optimizer step takes
    ``accum_steps`` of them (global steps, ``max_steps`` and checkpoints count optimizer
    steps). ``hash_config`` is the run's provenance (the settings the stage reads and digests
    of its input files, ``mofo.provenance``): ``checkpoint-last.pt`` is resumed only when its
    provenance is the same, and it is deleted when the run finishes, so a finished run is
    never resumed. ``max_steps`` stops after that many global steps with a checkpoint
    (status "stopped") -- a controlled stand-in for a kill. ``epoch_end`` (:class:`EpochEnd`)
    runs after every epoch and may end training early (status "finished", ``epoch`` = epochs
    run) and choose the final weights; its state travels in ``checkpoint-last.pt``. Returns a
    ``TrainResult``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    last_path, final_path = out_dir / LAST_CHECKPOINT, out_dir / CHECKPOINT
    log = MetricsLog(out_dir / METRICS_LOG, ctx.is_main, metrics_callback)
    hash_ = digest(hash_config)
    seed = int(stage_cfg["seed"])
    epochs = int(stage_cfg["epochs"])
    if not isinstance(stage_cfg["accum_steps"], int):
        raise ValueError(f"{stage}: accum_steps {stage_cfg['accum_steps']!r} is not resolved; "
                         f"plan the batch first (mofo.recipe.batch.planned_stage)")
    accum = int(stage_cfg["accum_steps"])
    steps_per_epoch = len(loader) // accum  # optimizer steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{stage}: the training loader has {len(loader)} batches, fewer than one "
            f"optimizer step of accum_steps={accum} (dataset of {len(loader.dataset)} clips, "
            f"batch size {stage_cfg['batch_size']} with drop_last)"
        )
    # One line per process: the job log shows how the launch (torchrun / srun) placed it.
    print(f"[mofo] {stage}: rank {ctx.info.rank} of {ctx.world_size} ({ctx.info.source}) on "
          f"{ctx.device}, {steps_per_epoch} steps per epoch", file=sys.stderr, flush=True)

    seed_everything(seed + ctx.info.rank)
    model.to(ctx.device)
    total_batch = effective_batch(stage_cfg, ctx.world_size)
    optimizer = build_optimizer(model, stage_cfg, total_batch)
    scheduler = build_scheduler(optimizer, stage_cfg, steps_per_epoch, total_batch)
    start = _resume_point(last_path, hash_config, hash_, model, optimizer, scheduler, ctx,
                          engine_cfg, stage)
    global_step = start.global_step
    if global_step == 0:
        log.reset()
    else:
        log.truncate_after(global_step)
    if epoch_end is not None and start.epoch_end_state is not None:
        epoch_end.load_state_dict(start.epoch_end_state)

    wrapped = wrap_model(model, optimizer, ctx, stage_cfg, engine_cfg,
                         int(stage_cfg["batch_size"]), accum)
    log_interval = max(1, int(stage_cfg["log_interval"]))
    checkpoint_every = max(1, int(stage_cfg["checkpoint_every"]))
    marker = out_dir / REQUEUE_MARKER
    if ctx.is_main and marker.exists():
        marker.unlink()
    loop = _Loop(wrapped, scheduler, task, engine_cfg, ctx, StopFlag().install(),
                 float(stage_cfg.get("clip_grad") or 0.0), stage, accum)
    losses: list[float] = []
    status = "finished"
    wrapped.model.train()

    def save(epoch: int, step_in_epoch: int, start_rng: dict) -> None:
        _save_last(last_path, wrapped, scheduler, epoch=epoch, step_in_epoch=step_in_epoch,
                   global_step=global_step, epoch_start_rng=start_rng, hash_=hash_,
                   provenance=hash_config, meta=meta, ctx=ctx,
                   epoch_end_state=epoch_end.state_dict() if epoch_end is not None else None)

    epoch = start.epoch
    try:
        for epoch in range(start.epoch, epochs):
            resuming_mid_epoch = epoch == start.epoch and start.step_in_epoch > 0
            if resuming_mid_epoch:
                ckpt_io.restore_rng_state(start.epoch_start_rng)
            elif epoch == start.epoch and start.rng is not None:
                ckpt_io.restore_rng_state(start.rng)
            epoch_start_rng = ckpt_io.capture_rng_state()
            set_loader_epoch(loader, epoch, seed)
            skip = start.step_in_epoch if resuming_mid_epoch else 0
            micro = _iterate_epoch(loader, skip * accum,
                                   start.rng if resuming_mid_epoch else None)
            step_in_epoch = skip
            epoch_loss, epoch_clips, t0 = 0.0, 0, time.perf_counter()
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"{stage} epoch {epoch}",
                       disable=not ctx.is_main, file=sys.stderr, leave=False)
            for _ in range(skip, steps_per_epoch):
                t_step = time.perf_counter()
                loss_sum, clips, stop_requested, extras = _step(
                    loop, itertools.islice(micro, accum), global_step, epoch, step_in_epoch,
                    steps_per_epoch)
                global_step += 1
                step_in_epoch += 1
                mean_loss = loss_sum / max(clips, 1.0)
                losses.append(mean_loss)
                epoch_loss += loss_sum
                epoch_clips += int(clips)
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if global_step % log_interval == 0 or step_in_epoch == steps_per_epoch:
                    log.write({"type": "step", "stage": stage, "epoch": epoch,
                               "step": global_step, "loss": mean_loss,
                               "lr": current_lr(optimizer),
                               "clips_per_s": clips / max(time.perf_counter() - t_step, 1e-9),
                               **{k: float(v) for k, v in extras.items()}}, global_step)
                if stop_requested:
                    save(epoch, step_in_epoch, epoch_start_rng)
                    raise _requeue(loop, marker, last_path, global_step)
                if max_steps is not None and global_step >= max_steps:
                    save(epoch, step_in_epoch, epoch_start_rng)
                    status = "stopped"
                    break
            bar.close()
            if status == "stopped":
                break
            seconds = time.perf_counter() - t0
            log.write({"type": "epoch", "stage": stage, "epoch": epoch, "step": global_step,
                       "loss": epoch_loss / max(epoch_clips, 1), "lr": current_lr(optimizer),
                       "seconds": seconds, "clips_per_s": epoch_clips / max(seconds, 1e-9)},
                      global_step)
            stop_early = _end_epoch(epoch_end, wrapped.model, epoch, global_step, log, ctx, stage)
            if stop_early:
                epochs = epoch + 1  # epochs run; no checkpoint-last: the run finishes now
                break
            if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs:
                save(epoch + 1, 0, ckpt_io.capture_rng_state())
            start = _StartPoint()
    finally:
        loop.stop.uninstall()

    if status == "finished":
        weights, meta = _final_from_hook(epoch_end, model, meta)
        _finish(model, final_path, last_path, global_step, epochs, hash_, hash_config, meta,
                log, ctx, stage, weights)
    return TrainResult(status, final_path if status == "finished" else None, last_path,
                       global_step, epochs if status == "finished" else epoch, losses)
