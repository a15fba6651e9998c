"""A small in-memory clip dataset with the same item layout as the real loader.

Used by the tests (engine, resume, DDP, DeepSpeed) and by ``bench.py`` to time the model
without the frame store. Each item: ``frames`` (3, T, S, S) float (ImageNet-normalised
scale), ``inbox`` (N,) bool, ``mask`` (N,) bool (same count in every item), ``label`` int,
``clip_id`` str, ``index`` int (plus ``verb``/``noun`` when ``verb_noun`` is given).
The class signal is a per-class brightness pattern, so a classifier can learn it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset


class SyntheticClipDataset(Dataset):
    def __init__(self, n: int, model_cfg: dict, num_classes: int = 4, mask_ratio: float = 0.9,
                 seed: int = 0, global_rng_jitter: float = 0.0,
                 verb_noun: tuple[int, int] | None = None):
        """``global_rng_jitter`` > 0 adds noise drawn from torch's *global* generator, which
        makes the items depend on the process RNG state like real augmentations do."""
        self.n = n
        self.t = int(model_cfg["num_frames"])
        self.s = int(model_cfg["input_size"])
        p, q = int(model_cfg["patch_size"]), int(model_cfg["tubelet_size"])
        self.grid = (self.t // q, self.s // p, self.s // p)
        self.num_tokens = math.prod(self.grid)
        self.n_masked = round(mask_ratio * self.num_tokens)
        self.num_classes = num_classes
        self.seed = seed
        self.jitter = global_rng_jitter
        self.verb_noun = verb_noun
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        label = index % self.num_classes
        frames = rng.normal(0.0, 0.3, size=(3, self.t, self.s, self.s)).astype(np.float32)
        # class signal: a bright quadrant that depends on the label
        half = self.s // 2
        qy, qx = divmod(label % 4, 2)
        frames[:, :, qy * half:(qy + 1) * half, qx * half:(qx + 1) * half] += 1.0 + label // 4
        x = torch.from_numpy(frames)
        if self.jitter > 0:
            x = x + self.jitter * torch.randn_like(x)  # global RNG on purpose
        inbox = np.zeros(self.grid, dtype=bool)
        gh, gw = self.grid[1], self.grid[2]
        inbox[:, qy * gh // 2:(qy + 1) * gh // 2, qx * gw // 2:(qx + 1) * gw // 2] = True
        mask_rng = np.random.default_rng([self.seed, index, self.epoch])
        mask = np.zeros(self.num_tokens, dtype=bool)
        mask[mask_rng.choice(self.num_tokens, self.n_masked, replace=False)] = True
        item = {
            "frames": x,
            "inbox": torch.from_numpy(inbox.reshape(-1)),
            "mask": torch.from_numpy(mask),
            "label": torch.tensor(label),
            "clip_id": f"synthetic_{index:05d}",
            "index": torch.tensor(index),
        }
        if self.verb_noun is not None:
            item["verb"] = torch.tensor(index % self.verb_noun[0])
            item["noun"] = torch.tensor((index // 2) % self.verb_noun[1])
        return item
