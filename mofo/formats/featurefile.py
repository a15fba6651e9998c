"""The features files of the ``features`` stage: one ``.npz`` per (encoder, split).

Kept apart from :mod:`mofo.evaluation.features` (which needs the models and the data loader)
so that readers, such as the probes, load numpy and nothing else of mofo.

Layout (``numpy.load(path)``, no pickle needed): one row per clip, aligned arrays

- ``clip_id``: str ``(N,)``; ``label``: int64 ``(N,)`` (-1 = unknown; EPIC: the verb class);
  ``split``: str ``(N,)``; ``features``: float32 ``(N, D)``;
- ``meta``: a 0-d str array holding JSON (source, encoder, pooling, model size, dataset, split).
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

    def __len__(self) -> int:
        return len(self.clip_id)


def write_features(path: str | Path, table: FeatureTable) -> Path:
    """Write ``table`` as ``path`` (.npz, the layout of the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, clip_id=np.asarray(table.clip_id, dtype=str),
             label=np.asarray(table.label, dtype=np.int64),
             split=np.asarray(table.split, dtype=str),
             features=np.asarray(table.features, dtype=np.float32),
             meta=np.asarray(json.dumps(table.meta)))
    tmp.replace(path)
    return path


def read_features(path: str | Path) -> FeatureTable:
    """A features file written by :func:`write_features`."""
    with np.load(path, allow_pickle=False) as data:
        return FeatureTable(data["clip_id"], data["label"], data["split"], data["features"],
                            json.loads(str(data["meta"])))
