"""Checkpoints that a killed or requeued run resumes from at the same step.

A checkpoint is one ``torch.save`` file written atomically (temporary file in the same
folder, then ``os.replace``), so a kill during the write leaves the previous checkpoint
intact. It holds the model (unwrapped ``state_dict``), optimizer, scheduler, ``epoch`` /
``step_in_epoch`` / ``global_step``, the RNG states of every rank (torch, CUDA, numpy,
python) and the run's provenance with its hash (``mofo.provenance``) -- tensors and plain
values only, so it loads with ``weights_only=True`` and a planted pickle cannot run code.
Weights are saved in VideoMAE's layout (``model`` key), so
``mofo.models.checkpoint.load_pretrained`` reads ours and the official ones alike.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# 2: RNG states as tensors and plain values, so the file loads with weights_only=True
# (format 1 pickled numpy arrays).
CHECKPOINT_FORMAT = 2


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses to build (a
    planted or foreign pickle, or a format-1 file); the message names the file."""


def capture_rng_state() -> dict[str, Any]:
    """Every random generator the training step touches, as tensors and plain values only
    (ints, floats, str, tuples, lists: what ``weights_only=True`` loads): torch and CUDA as
    their byte tensors, numpy's MT19937 keys as an int64 tensor, python's state as tuples."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": (int(version), tuple(int(v) for v in internal), gauss_next),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
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
    """Read a checkpoint written by ``atomic_torch_save`` with ``weights_only=True``.

    Raises ``FileNotFoundError`` when it is missing, :class:`UnsafeCheckpointError` (naming
    the file) when it holds anything but tensors and plain values -- no code in it runs --
    and ``RuntimeError`` for a truncated / foreign file or one without a ``model`` key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: never unpickled
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values "
            f"(not written by this version of mofo, or tampered with); delete it to train "
            f"from step 0. torch said: {str(exc).splitlines()[-1][:300]}"
        ) from exc
    except Exception as exc:  # truncated file, wrong format
        raise RuntimeError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RuntimeError(f"{path} is not a mofo checkpoint (no 'model' key)")
    return ckpt
