"""Where and in what precision a stage runs: seeding, moving batches to the device, bf16 autocast.

Shared by training, evaluation, features and the benchmarks (one definition of each, so a
fine-tuned model is evaluated under the precision it was trained with).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

from mofo.inputs.transforms import normalize_clip


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_frames(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Clips on ``device`` as the model takes them: a uint8 batch (the loader's
    ``engine.uint8_frames``) is normalised there (``mofo.inputs.transforms.normalize_clip``);
    float clips, normalised by the loader already, are moved as they are."""
    frames = frames.to(device, non_blocking=True)
    return normalize_clip(frames) if frames.dtype == torch.uint8 else frames


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) batch to ``device``; a batch's ``frames`` go through
    :func:`device_frames`, so they arrive normalised whichever side normalised them."""
    if isinstance(batch, dict) and isinstance(batch.get("frames"), torch.Tensor):
        moved = {k: to_device(v, device) for k, v in batch.items() if k != "frames"}
        return {**moved, "frames": device_frames(batch["frames"], device)}
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# The autocast dtype of engine.precision auto / bf16 (torch's autocast and DeepSpeed's config).
AUTOCAST_DTYPE = torch.bfloat16


def uses_autocast(engine_cfg: dict, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast: ``engine.precision`` bf16, or auto on a
    GPU; fp32 otherwise."""
    precision = engine_cfg["precision"]
    return not (precision == "fp32" or (precision == "auto" and device.type != "cuda"))


def autocast_context(engine_cfg: dict, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (``engine.precision`` auto/bf16), fp32 otherwise."""
    if not uses_autocast(engine_cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPE)
