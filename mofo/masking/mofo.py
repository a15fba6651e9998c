"""MOFO's motion-guided tube masking (paper section 2.2), with the published defects fixed.

The unit is the TUBE (one spatial cell over all frames), as in VideoMAE's tube masking. A tube
is "in the box" when any of its tokens is (the box moves; masking the whole tube hides the
moving region at every time it passes through the cell). Per clip exactly
``n_mask = round(ratio * n_tubes)`` tubes are masked: first
``min(n_mask, floor(inbox_ratio * n_inbox_tubes))`` drawn uniformly from the in-box tubes,
then the rest uniformly from ALL remaining tubes (in-box leftovers included). Unlike the
authors' generator this uses a true rectangle test, every frame's box, any patch size, and
never falls short of the mask count.
"""

from __future__ import annotations

import math

import numpy as np

from mofo.masking.grid import Grid, inbox_tubes
from mofo.masking.tube import num_masked, tubes_to_tokens

_FLOOR_EPS = 1e-9  # so that floor(0.29 * 100) is 29, not 28 (binary fractions)


def inbox_quota(n_mask: int, n_inbox_tubes: int, inbox_ratio: float) -> int:
    """In-box tubes that are always masked: ``min(n_mask, floor(inbox_ratio * n_inbox))``."""
    if not 0.0 <= inbox_ratio <= 1.0:
        raise ValueError(f"masking.inbox_ratio must lie in [0, 1], got {inbox_ratio}")
    return min(n_mask, math.floor(inbox_ratio * n_inbox_tubes + _FLOOR_EPS))


def mofo_mask(
    grid: Grid, ratio: float, inbox: np.ndarray, inbox_ratio: float, generator: np.random.Generator
) -> np.ndarray:
    """bool ``(t*h*w,)``, True = masked; ``inbox`` is the ``(t*h*w,)`` in-box token flags."""
    tubes_in = inbox_tubes(inbox, grid)
    n_tubes = tubes_in.size
    n_mask = num_masked(n_tubes, ratio)
    in_idx = np.flatnonzero(tubes_in)
    quota = inbox_quota(n_mask, in_idx.size, inbox_ratio)
    masked = np.zeros(n_tubes, dtype=bool)
    masked[generator.choice(in_idx, size=quota, replace=False)] = True
    rest = np.flatnonzero(~masked)
    masked[generator.choice(rest, size=n_mask - quota, replace=False)] = True
    return tubes_to_tokens(masked, grid)
