"""Sizes and synthetic batches of ``mofo bench gpu`` (shared by the benchmark, its correctness
checks and its DDP / DeepSpeed worker process).

A :class:`BenchPreset` fixes the model input, the model-size overrides, the batch sizes and the
number of timed steps. ``base`` is VideoMAE's ViT-B (16 frames of 224², patch 16, tubelet 2);
``tiny`` is a one-block model on 4 frames of 32², small enough for CI on two CPU cores.

Batches are built in memory from :class:`~mofo.bench.synthetic.SyntheticClipDataset`; the
pretraining batches get real ``tube`` or ``mofo`` masks (``mofo.masking.make_mask``) computed
from the synthetic clips' in-box flags, so both strategies run the path they run in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from mofo.bench.synthetic import SyntheticClipDataset
from mofo.masking import make_mask, token_grid

NUM_CLASSES = 6  # synthetic fine-tuning labels (the demo's class count)


@dataclass(frozen=True)
class BenchPreset:
    """One benchmark size; ``overrides`` go to ``build_pretrain_model`` / ``build_classifier``."""

    name: str
    model: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrain_batch: int = 16
    finetune_batch: int = 8
    steps: int = 5  # timed optimizer steps per row (after one warm-up step)
    eval_batches: int = 4
    loader_batches: int = 4
    checkpoint_batch: int = 2  # clips per step of the GPU -> CPU checkpoint check


PRESETS: dict[str, BenchPreset] = {
    "base": BenchPreset(
        "base",
        {"size": "base", "input_size": 224, "num_frames": 16, "sampling_rate": 2,
         "patch_size": 16, "tubelet_size": 2},
        pretrain_batch=16, finetune_batch=8, steps=5, eval_batches=4, loader_batches=4,
        checkpoint_batch=2,
    ),
    "tiny": BenchPreset(
        "tiny",
        {"size": "demo", "input_size": 32, "num_frames": 4, "sampling_rate": 1,
         "patch_size": 8, "tubelet_size": 2},
        overrides={"depth": 1, "decoder_depth": 1},
        pretrain_batch=4, finetune_batch=4, steps=2, eval_batches=2, loader_batches=2,
        checkpoint_batch=2,
    ),
}


def get_preset(name: str) -> BenchPreset:
    """The preset called ``name``; a clear error naming the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown benchmark size {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def synthetic_items(preset: BenchPreset, n: int, mask_ratio: float, seed: int = 0) -> dict:
    """``n`` synthetic clips collated into one batch (frames, inbox, mask, label, ...)."""
    ds = SyntheticClipDataset(n, preset.model, num_classes=NUM_CLASSES, mask_ratio=mask_ratio,
                              seed=seed)
    return default_collate([ds[i] for i in range(n)])


def pretrain_batch(preset: BenchPreset, masking_cfg: dict, strategy: str, n: int | None = None,
                   seed: int = 0) -> dict:
    """A pretraining batch whose ``mask`` comes from masking ``strategy`` (tube | mofo).

    ``masking_cfg`` supplies ``ratio`` and ``inbox_ratio`` (the config's ``masking`` section).
    """
    n = preset.pretrain_batch if n is None else n
    ratio = float(masking_cfg["ratio"])
    batch = synthetic_items(preset, n, ratio, seed)
    grid = token_grid(preset.model)
    rng = np.random.default_rng(seed)
    masks = [make_mask(strategy, grid, ratio, flags.numpy(), float(masking_cfg["inbox_ratio"]),
                       rng) for flags in batch["inbox"]]
    batch["mask"] = torch.from_numpy(np.stack(masks))
    return batch


def finetune_batch(preset: BenchPreset, n: int | None = None, seed: int = 1) -> dict:
    """A fine-tuning batch (labels 0..NUM_CLASSES-1 and the clips' in-box flags)."""
    return synthetic_items(preset, preset.finetune_batch if n is None else n, 0.9, seed)


def finetune_heads() -> dict[str, int]:
    """The classifier outputs of the synthetic fine-tuning task."""
    return {"label": NUM_CLASSES}


def build_pretrainer(preset: BenchPreset) -> torch.nn.Module:
    """The preset's VideoMAE pretraining model (fresh weights from torch's global RNG)."""
    from mofo.models.build import build_pretrain_model

    return build_pretrain_model(preset.model, **preset.overrides)


def build_finetuner(preset: BenchPreset, head: str, finetune_cfg: dict,
                    head_init_scale: float | None = None) -> torch.nn.Module:
    """The preset's classifier with the ``mean`` or ``mca`` head (config's drop path)."""
    from mofo.models.build import build_classifier

    scale = float(finetune_cfg["head_init_scale"]) if head_init_scale is None else head_init_scale
    return build_classifier(preset.model, NUM_CLASSES, pooling=head,
                            drop_path=float(finetune_cfg["drop_path"]),
                            head_init_scale=scale, **preset.overrides)
