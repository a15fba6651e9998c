"""Checkpoints that a killed or requeued run resumes from at the same step.

A checkpoint is one ``torch.save`` file written atomically (temporary file in the same
folder, then ``os.replace``), so a kill during the write leaves the previous checkpoint
intact. It holds the model (unwrapped ``state_dict``), optimizer, scheduler, ``epoch`` /
``step_in_epoch`` / ``global_step``, the RNG states of every rank (torch, CUDA, numpy,
python) and the run's provenance with its hash (``mofo.provenance``). Weights are saved in VideoMAE's layout
(``model`` key), so ``mofo.models.checkpoint.load_pretrained`` reads ours and the official
ones alike.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = 1


def capture_rng_state() -> dict[str, Any]:
    """Every random generator the training step touches, as picklable objects."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``atomic_torch_save`` (weights and plain objects).

    ``weights_only=False`` is needed for the numpy / python RNG states; only load
    checkpoints this project wrote (model weights from elsewhere go through
    ``mofo.models.checkpoint.load_pretrained``, which uses ``weights_only=True``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated file, wrong format
        raise RuntimeError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RuntimeError(f"{path} is not a mofo checkpoint (no 'model' key)")
    return ckpt
