"""Which fine-tuned weights a run keeps: the last epoch's, or the best validation epoch's.

``finetune.selection`` chooses:

- ``last`` (the default, VideoMAE's): train ``finetune.epochs`` epochs, keep the last epoch's
  weights; nothing is validated during training.
- ``best`` (the MOFO code's ``run_class_finetuning_BB.py``): after every epoch the model is
  validated on ``evaluate.split`` -- the split the evaluation reports, as the MOFO code does --
  and ``checkpoint.pt`` gets the weights of the epoch with the highest validation top-1 (its
  "Max accuracy"); training stops early once the validation loss has not improved for
  ``finetune.patience`` epochs in a row (0 = never; ``finetune.epochs`` stays the cap).

The rule itself is the pure function :func:`update_selection`, the MOFO code's loop:

- top-1 improves only when strictly higher than the best so far (a tie keeps the earlier
  epoch); the first epoch is always the first best (the MOFO code starts at 0 % and would
  keep no weights from a run that never rises above it);
- the validation loss improves when it is lower than or equal to the lowest so far (the MOFO
  code counts ``loss > best`` as a bad epoch, anything else resets the counter); a NaN loss
  counts as a bad epoch (the MOFO code would have reset the counter and never stopped);
- stop when the bad-epoch counter reaches ``patience``.

Validation (:func:`validation_metrics`) is one view per clip -- the centre crop of the
centre temporal clip, as VideoMAE's per-epoch validation -- in eval mode under the
training's autocast. ``val_loss`` is plain cross-entropy (no mixup, no label smoothing) summed
over the model's heads, averaged over clips; ``val_top1`` is the percentage of clips whose
every head's arg-max is right: the plain top-1 for one head (``label`` or ``action``), and for
EPIC-KITCHENS' ``verb`` + ``noun`` heads the action top-1 (verb and noun both right), which is
what ``mofo.evaluation.evaluate`` reports as ``top1``; the per-head top-1s are logged beside
it (``val_verb_top1`` ...). Clips without a label on some head (label < 0) are left out; an
EPIC clip whose (verb, noun) pair is not one of the ``action`` head's classes counts as a
wrong action and stays out of the loss (:func:`head_targets`). The MOFO code averages its
loss over batches; here it is over clips.

Under DDP every rank validates every ``world``-th clip and the sums are all-reduced, so all
ranks see the same numbers and take the same decision; the stop votes are all-reduced as
well, so the ranks stop together. Validation leaves the global random generators as it found
them, so a ``best`` run trains exactly as a ``last`` run of the same seed (up to its stop).

The best weights are kept in memory on rank 0 and in ``checkpoint-last.pt`` with the rule's
state (best epoch, top-1, loss, lowest loss, bad-epoch counter), so a preempted run resumes
knowing its best so far; the final checkpoint's ``meta["selection"]`` says what was kept
(:func:`last_selection_meta`, :meth:`BestEpochSelection.final`). Epochs are 0-based, as the
``epoch`` of ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mofo.runtime.device import autocast_context, to_device
from mofo.runtime.distributed import DistContext, all_reduce_sum, unwrap
from mofo.training import resume_state as ckpt_io

Measure = Callable[[nn.Module, int], dict]  # (model, epoch) -> {"val_loss", "val_top1", ...}


@dataclass(frozen=True)
class SelectionState:
    """The best-epoch rule's memory (everything a resumed run needs besides the weights)."""

    best_epoch: int = -1  # epoch of the highest validation top-1 (-1: none validated yet)
    best_top1: float = -math.inf
    best_loss: float = math.nan  # validation loss of best_epoch
    min_loss: float = math.inf  # lowest validation loss so far: the early-stopping reference
    bad_epochs: int = 0  # epochs in a row whose loss did not improve on min_loss
    epochs_run: int = 0  # epochs validated


def update_selection(state: SelectionState, epoch: int, val_loss: float, val_top1: float,
                     patience: int) -> tuple[SelectionState, bool, bool]:
    """One epoch's validation through the rule (see the module docstring).

    Returns ``(new state, top-1 improved (keep these weights), stop)``; ``stop`` is True when
    ``patience`` > 0 and the validation loss has now not improved for ``patience`` epochs.
    """
    improved = val_top1 > state.best_top1
    loss_improved = val_loss <= state.min_loss  # False for NaN
    new = replace(
        state,
        best_epoch=epoch if improved else state.best_epoch,
        best_top1=val_top1 if improved else state.best_top1,
        best_loss=val_loss if improved else state.best_loss,
        min_loss=val_loss if loss_improved else state.min_loss,
        bad_epochs=0 if loss_improved else state.bad_epochs + 1,
        epochs_run=epoch + 1,
    )
    return new, improved, patience > 0 and new.bad_epochs >= patience


# --------------------------------------------------------------------------- validation
UNLABELLED = -1  # a head's target: the clip has no label (left out of loss and top-1)
OUT_OF_VOCABULARY = -2  # labelled, but no class of the head (EPIC pair outside the actions)


def head_targets(heads: list[str], batch: dict,
                 action_lookup: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each head's validation targets: the batch's ``label`` / ``verb`` / ``noun``; for an
    ``action`` head the action class of the clip's (verb, noun) pair from ``action_lookup``
    (``mofo.training.finetune.action_lookup``), :data:`OUT_OF_VOCABULARY` for a pair that is
    not an action class (it counts as a wrong action, as in the MOFO code's evaluation), and
    :data:`UNLABELLED` where verb or noun is unknown."""
    out = {name: batch[name].long() for name in heads if name != "action"}
    if "action" in heads:
        if action_lookup is None:
            raise ValueError("an 'action' head needs the action vocabulary's lookup table")
        verb, noun = batch["verb"].long(), batch["noun"].long()
        action = action_lookup.to(verb.device)[verb.clamp(min=0), noun.clamp(min=0)]
        action = torch.where(action >= 0, action, torch.full_like(action, OUT_OF_VOCABULARY))
        out["action"] = torch.where((verb >= 0) & (noun >= 0), action,
                                    torch.full_like(action, UNLABELLED))
    return out


def _batch_sums(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                heads: list[str]) -> torch.Tensor:
    """``[loss sum, clips in the loss, clips all right, clips, right per head...]`` of one
    batch (float64, CPU). Clips = those labelled on every head; the loss is over those whose
    every target is a class (no :data:`OUT_OF_VOCABULARY`)."""
    counted = torch.stack([targets[name] != UNLABELLED for name in heads]).all(0)
    in_loss = counted & torch.stack([targets[name] >= 0 for name in heads]).all(0)
    loss = 0.0
    all_right = counted.clone()
    per_head = []
    for name in heads:
        logits, target = out[name].float(), targets[name]
        loss += float(F.cross_entropy(logits[in_loss], target[in_loss], reduction="sum"))
        right = logits.argmax(1) == target  # never for a negative target
        all_right &= right
        per_head.append(float((right & counted).sum()))
    return torch.tensor([loss, float(in_loss.sum()), float(all_right.sum()),
                         float(counted.sum()), *per_head], dtype=torch.float64)


@torch.no_grad()
def validation_metrics(model: nn.Module, loader: Any, heads: list[str], ctx: DistContext,
                       engine_cfg: dict,
                       action_lookup: torch.Tensor | None = None) -> dict[str, float]:
    """Validate ``model`` (unwrapped) on this rank's ``loader``; sums all-reduced over ranks.

    Returns ``{"val_loss", "val_top1", "val_clips"}`` (+ ``val_<head>_top1`` for several
    heads); see the module docstring and :func:`head_targets`. Raises ValueError, on every
    rank alike, when no clip is labelled. The model's train/eval mode and the global RNG
    states are restored.
    """
    was_training, rng = model.training, ckpt_io.capture_rng_state()
    model.eval()
    sums = torch.zeros(4 + len(heads), dtype=torch.float64)
    try:
        for batch in loader:
            batch = to_device(batch, ctx.device)
            with autocast_context(engine_cfg, ctx.device):
                out = model(batch["frames"], batch["inbox"].bool())
            out = out if isinstance(out, dict) else {heads[0]: out}
            sums += _batch_sums(out, head_targets(heads, batch, action_lookup), heads)
    finally:
        model.train(was_training)
        ckpt_io.restore_rng_state(rng)
    device = ctx.device if ctx.backend == "nccl" else "cpu"
    loss, loss_clips, all_right, clips, *right = (
        float(v) for v in all_reduce_sum(sums.to(device)).cpu())
    if clips == 0:
        raise ValueError("finetune.selection best: the validation split has no labelled clip "
                         "(evaluate.split must be a labelled split)")
    if loss_clips == 0:
        raise ValueError(f"finetune.selection best: none of the {int(clips)} validation clips "
                         "has a label that is a class of the model (every (verb, noun) pair "
                         "is outside the action vocabulary), so there is no validation loss")
    record = {"val_loss": loss / loss_clips, "val_top1": 100.0 * all_right / clips,
              "val_clips": int(clips)}
    if len(heads) > 1:
        record.update({f"val_{name}_top1": 100.0 * r / clips for name, r in zip(heads, right)})
    return record


def validation_loader(config: dict, manifest_path: str | Path, results_dir: str | Path,
                      ctx: DistContext) -> Any:
    """This rank's share (every ``world``-th clip) of ``evaluate.split``, one centre view per
    clip (test mode, ``test_view=(0, 0)`` of 1 clip x 1 crop), in ``evaluate.batch_size``
    batches with ``evaluate.num_workers`` workers, in order."""
    from torch.utils.data import Subset

    from mofo.runtime import data as data_io

    ev = config["evaluate"]
    dataset = data_io.build_dataset(config, manifest_path, results_dir, ev["split"], "test",
                                    test_view=(0, 0), num_clips=1, num_crops=1)
    share = Subset(dataset, range(ctx.info.rank, len(dataset), ctx.world_size))
    return data_io.build_loader(share, int(ev["batch_size"]), int(ev["num_workers"]),
                                shuffle=False, seed=0, drop_last=False, distributed=False)


# --------------------------------------------------------------------------- the hook
def _any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    device = ctx.device if ctx.backend == "nccl" else "cpu"
    return bool(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64,
                                            device=device)).item() > 0)


class BestEpochSelection:
    """``train(..., epoch_end=...)`` hook of ``finetune.selection: best``.

    Called after every epoch on every rank: measures (``measure(model, epoch)``, by default
    :func:`validation_metrics`), updates the rule, copies the weights to CPU memory on rank 0
    when top-1 improved, and returns ``(stop, val record)`` with the stop agreed by all ranks.
    ``state_dict`` / ``load_state_dict`` carry the rule's state and (rank 0) the best weights
    through ``checkpoint-last.pt``; ``final`` gives the weights and ``meta`` of
    ``checkpoint.pt``.
    """

    def __init__(self, measure: Measure, ctx: DistContext, patience: int, split: str):
        self.measure, self.ctx = measure, ctx
        self.patience, self.split = int(patience), str(split)
        self.state = SelectionState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped_early = False

    def __call__(self, model: nn.Module, epoch: int) -> tuple[bool, dict]:
        module = unwrap(model)
        record = self.measure(module, epoch)
        self.state, improved, stop = update_selection(
            self.state, epoch, float(record["val_loss"]), float(record["val_top1"]),
            self.patience)
        if improved and self.ctx.is_main:
            self.best_weights = {k: v.detach().to("cpu", copy=True)
                                 for k, v in module.state_dict().items()}
        self.stopped_early = _any_rank(stop, self.ctx)
        return self.stopped_early, {"type": "val", **record,
                                    "best_epoch": self.state.best_epoch,
                                    "best_top1": self.state.best_top1,
                                    "bad_epochs": self.state.bad_epochs}

    def state_dict(self) -> dict:
        return {"state": asdict(self.state), "best_weights": self.best_weights}

    def load_state_dict(self, saved: dict) -> None:
        self.state = SelectionState(**saved["state"])
        self.best_weights = saved.get("best_weights") if self.ctx.is_main else None
        if self.ctx.is_main and self.state.best_epoch >= 0 and self.best_weights is None:
            raise RuntimeError("the resume checkpoint names a best epoch but holds no weights")

    def final(self, model: nn.Module) -> tuple[dict | None, dict]:
        """``(weights of checkpoint.pt, meta entries)``: the best epoch's weights (rank 0; None
        elsewhere) and ``{"selection": {"rule": "best", ...}}``."""
        s = self.state
        return self.best_weights, {"selection": {
            "rule": "best", "epoch": s.best_epoch, "val_top1": s.best_top1,
            "val_loss": s.best_loss, "split": self.split, "epochs_run": s.epochs_run,
            "stopped_early": self.stopped_early, "patience": self.patience}}


def last_selection_meta(stage_cfg: dict) -> dict:
    """``meta["selection"]`` of a ``last`` run (known before it starts)."""
    epochs = int(stage_cfg["epochs"])
    return {"rule": "last", "epoch": epochs - 1, "val_top1": None, "val_loss": None,
            "split": None, "epochs_run": epochs, "stopped_early": False}


def selection_hook(config: dict, manifest_path: str | Path, results_dir: str | Path,
                   heads: list[str], ctx: DistContext,
                   action_lookup: torch.Tensor | None = None) -> BestEpochSelection | None:
    """The ``epoch_end`` hook that ``finetune.selection`` asks for: None for ``last``, a
    :class:`BestEpochSelection` validating on ``evaluate.split`` for ``best``
    (``action_lookup``: an ``action`` head's (verb, noun) -> class table, see
    :func:`head_targets`)."""
    ft = config["finetune"]
    if ft["selection"] == "last":  # the schema allows last | best
        return None
    loader = validation_loader(config, manifest_path, results_dir, ctx)

    def measure(model: nn.Module, _epoch: int) -> dict:
        return validation_metrics(model, loader, heads, ctx, config["engine"], action_lookup)

    return BestEpochSelection(measure, ctx, int(ft["patience"]),
                              config["evaluate"]["split"])
