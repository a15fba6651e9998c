"""The training / evaluation DataLoader: sampler, worker setup and per-epoch reseeding.

:func:`make_loader` builds the loader over any map-style dataset (``VideoClipDataset`` in
practice); :func:`set_loader_epoch` starts an epoch: it tells the sampler and the dataset the
epoch and reseeds the loader's generator, so an epoch's order and worker seeds depend only on
``(seed, epoch)`` (a resumed run sees the same orders as an uninterrupted one).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ShuffleSampler(Sampler[int]):
    """A random order drawn from ``(seed, epoch)``: the same order for the same epoch in any
    run (``RandomSampler`` continues one stream, so a resumed run would see other orders)."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = int(length), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def worker_init_fn(worker_id: int) -> None:
    """Per worker: one OpenCV thread (the workers are the parallelism) and the global NumPy /
    Python generators seeded from the worker's torch seed (the transforms do not use them, but
    any library code that does gets distinct, reproducible streams)."""
    cv2.setNumThreads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset``: ``DistributedSampler`` when ``distributed`` (needs an
    initialised process group), else :class:`ShuffleSampler` / sequential order; persistent
    workers when ``num_workers > 0``. Call :func:`set_loader_epoch` before every epoch."""
    if distributed:
        sampler: Sampler[int] | None = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = ShuffleSampler(len(dataset), seed)
    else:
        sampler = None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=worker_init_fn,
        persistent_workers=num_workers > 0,
        # Workers start from a fresh forkserver process, not a fork of this one: a fork taken
        # after OpenCV's thread pool has run (flow, resizes) deadlocks in the child.
        multiprocessing_context="forkserver" if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int = 0) -> None:
    """Tell the sampler and the dataset which epoch starts, and reseed the loader's
    generator, so the epoch's order and worker seeds depend only on ``(seed, epoch)``."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(getattr(batch_sampler, "sampler", None), "set_epoch"):
        batch_sampler.sampler.set_epoch(epoch)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed * 100_003 + epoch)
