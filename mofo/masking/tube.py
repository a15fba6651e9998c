"""VideoMAE tube masking: one random spatial mask repeated over every temporal slice."""

from __future__ import annotations

import math

import numpy as np

from mofo.masking.grid import Grid


def num_masked(n: int, ratio: float) -> int:
    """``round(ratio * n)`` with halves rounded up (not Python's banker's rounding)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    return min(n, math.floor(ratio * n + 0.5))


def tubes_to_tokens(tube_mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Repeat a spatial ``(h*w,)`` mask over the ``t`` slices -> ``(t*h*w,)`` in token order."""
    return np.tile(np.asarray(tube_mask, dtype=bool), grid[0])


def tube_mask(grid: Grid, ratio: float, generator: np.random.Generator) -> np.ndarray:
    """bool ``(t*h*w,)``, True = masked: exactly ``round(ratio*h*w)`` tubes, i.e. that many x t
    tokens, chosen uniformly."""
    _, h, w = grid
    n_tubes = h * w
    tubes = np.zeros(n_tubes, dtype=bool)
    tubes[generator.choice(n_tubes, size=num_masked(n_tubes, ratio), replace=False)] = True
    return tubes_to_tokens(tubes, grid)
