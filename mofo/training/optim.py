"""Optimizer and learning-rate schedule (timm's, set up the VideoMAE way).

Weight decay skips biases, norms, position embeddings and tokens (timm's
``create_optimizer_v2`` filters 1-d parameters and the names in ``model.no_weight_decay()``);
layer-wise lr decay uses timm's ``param_groups_layer_decay`` with VideoMAE's layer ids
(``VIT_GROUP_MATCHER``). The schedule is VideoMAE's per-iteration cosine with linear warm-up,
all three lrs (peak, floor, warm-up start) scaled by total batch / 256.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.scheduler import CosineLRScheduler

from mofo.recipe.batch import scaled_lr

# VideoMAE/BEiT layer ids for timm's layer decay (our models have no group_matcher()):
# embeddings are layer 0, blocks.i is layer i+1, everything after (norm, fc_norm, head, the
# MCA cross_block) is the top layer with lr scale 1.
VIT_GROUP_MATCHER = {
    "stem": r"^(?:patch_embed|pos_embed|cls_token)",
    "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
}


class _MatcherView:
    """Duck-typed stand-in exposing ``named_parameters`` and ``group_matcher`` -- the only two
    things timm's ``param_groups_layer_decay`` asks of a model."""

    def __init__(self, model: torch.nn.Module, matcher: dict):
        self._model, self._matcher = model, matcher

    def named_parameters(self, *args, **kwargs):
        return self._model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> dict:
        return self._matcher


def adamw_kernel(model: torch.nn.Module) -> dict[str, bool]:
    """torch AdamW's implementation for where the model lives: the fused CUDA kernel on a GPU
    (one launch for all parameters instead of several per tensor), the plain per-tensor loop
    on the CPU (bit-for-bit the results every CPU test and the demo table were made with)."""
    on_gpu = any(p.is_cuda for p in model.parameters())
    return {"fused": True, "foreach": False} if on_gpu else {"foreach": False}


def build_optimizer(
    model: torch.nn.Module, stage_cfg: dict, total_batch: int
) -> torch.optim.Optimizer:
    """AdamW with ``stage_cfg``'s betas / weight decay / (optional) layer decay.

    ``stage_cfg`` is the ``pretrain`` or ``finetune`` config section; the peak lr is
    ``base_lr * total_batch / 256``. Layer decay groups the parameters by
    ``VIT_GROUP_MATCHER`` (VideoMAE parameter names).
    """
    lr = scaled_lr(stage_cfg["base_lr"], total_batch)
    betas = tuple(stage_cfg["betas"])
    kernel = adamw_kernel(model)
    layer_decay = stage_cfg.get("layer_decay")
    if layer_decay is None or layer_decay >= 1.0:  # 1.0 means "no decay"
        return create_optimizer_v2(model, opt="adamw", lr=lr,
                                   weight_decay=stage_cfg["weight_decay"], betas=betas,
                                   **kernel)
    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(
        _MatcherView(model, VIT_GROUP_MATCHER), weight_decay=stage_cfg["weight_decay"],
        no_weight_decay_list=no_wd, layer_decay=layer_decay,
    )
    return create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=0.0, betas=betas,
                               **kernel)


class VideoMAECosine(CosineLRScheduler):
    """timm's per-iteration cosine with VideoMAE's warm-up: VideoMAE's ``cosine_scheduler``
    warms up with ``np.linspace(warmup_lr, lr, warmup_iters)``, which reaches the peak on
    the LAST warm-up step; timm's linear warm-up reaches it one step later. The cosine part
    is the same in both (``t_initial`` = the steps after warm-up). Per parameter group the
    value is multiplied by its ``lr_scale`` (layer decay), as VideoMAE does."""

    def _get_lr(self, t: int) -> list[float]:
        if 0 < t < self.warmup_t and self.warmup_t > 1:
            return [self.warmup_lr_init + t * (base - self.warmup_lr_init) / (self.warmup_t - 1)
                    for base in self.base_values]
        return super()._get_lr(t)


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage_cfg: dict, steps_per_epoch: int, total_batch: int
) -> CosineLRScheduler:
    """VideoMAE's schedule (:class:`VideoMAECosine`): ``warmup_epochs`` of linear warm-up
    from ``warmup_lr`` to the peak, then a cosine to ``min_lr`` over the remaining steps; the
    engine calls ``step_update(global_step)`` every optimizer step. ``min_lr`` and
    ``warmup_lr`` are quoted per 256 clips and scaled to ``total_batch`` like the peak lr
    (VideoMAE scales all three)."""
    total = max(1, stage_cfg["epochs"] * steps_per_epoch)
    warmup = min(round(stage_cfg["warmup_epochs"] * steps_per_epoch), total - 1)
    return VideoMAECosine(
        optimizer,
        t_initial=total - warmup,
        lr_min=scaled_lr(stage_cfg["min_lr"], total_batch),
        warmup_t=warmup,
        warmup_lr_init=scaled_lr(stage_cfg["warmup_lr"], total_batch),
        warmup_prefix=True,
        t_in_epochs=False,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest lr over the parameter groups (the head's, with layer decay)."""
    return max(group["lr"] for group in optimizer.param_groups)
