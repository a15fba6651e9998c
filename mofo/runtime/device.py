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


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) batch to ``device``."""
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
