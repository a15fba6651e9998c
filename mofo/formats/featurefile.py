"""The features files of the ``features`` stage: one ``.npz`` per (encoder, split).

Kept apart from :mod:`mofo.evaluation.features` (which needs the models and the data loader)
so that readers, such as the probes, load numpy and nothing else of mofo.

Layout (``numpy.load(path)``, no pickle needed): one row per clip, aligned arrays

- ``clip_id``: str ``(N,)``; ``label``: int64 ``(N,)`` (-1 = unknown; EPIC: the verb class);
  ``split``: str ``(N,)``; ``features``: float32 ``(N, D)``;
- ``tokens`` (optional, only in files made with ``probe.attentive.enabled``): float16
  ``(N, T, D)``, every clip's ``T = t x h x w`` encoder output tokens in token order (t, h, w),
  the input of the attentive probe. Size ``N x T x D x 2`` bytes: the demo's 480 train clips
  x 64 x 96 ~ 6 MB, but SSV2 train with ViT-B 169k x 1568 x 768 x 2 B ~ 400 GB (the real-data
  overlays may switch it off). The file is read whole (no memory map inside an ``.npz``);
- ``meta``: a 0-d str array holding JSON (source, encoder, pooling, model size, dataset, split,
  ``token_grid`` ``[t, h, w]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class FeatureTable:
    """One features file: aligned per-clip rows and the file's ``meta``."""

    clip_id: np.ndarray  # str (N,)
    label: np.ndarray  # int64 (N,)
    split: np.ndarray  # str (N,)
    features: np.ndarray  # float32 (N, D)
    meta: dict
    tokens: np.ndarray | None = None  # float16 (N, T, D), token order (t, h, w); or None

    def __len__(self) -> int:
        return len(self.clip_id)


def write_features(path: str | Path, table: FeatureTable) -> Path:
    """Write ``table`` as ``path`` (.npz, the layout of the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    optional = {}
    if table.tokens is not None:  # written only when present
        if len(table.tokens) != len(table.clip_id) or np.ndim(table.tokens) != 3:
            raise ValueError(f"tokens must be (N={len(table.clip_id)}, T, D), "
                             f"got {np.shape(table.tokens)}")
        optional["tokens"] = np.asarray(table.tokens, dtype=np.float16)
    np.savez(tmp, clip_id=np.asarray(table.clip_id, dtype=str),
             label=np.asarray(table.label, dtype=np.int64),
             split=np.asarray(table.split, dtype=str),
             features=np.asarray(table.features, dtype=np.float32),
             meta=np.asarray(json.dumps(table.meta)), **optional)
    tmp.replace(path)
    return path


def read_features(path: str | Path) -> FeatureTable:
    """A features file written by :func:`write_features` (``tokens`` None where it has none)."""
    with np.load(path, allow_pickle=False) as data:
        tokens = data["tokens"] if "tokens" in data.files else None
        return FeatureTable(data["clip_id"], data["label"], data["split"], data["features"],
                            json.loads(str(data["meta"])), tokens)
