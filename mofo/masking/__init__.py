"""Masking strategies for pretraining, selected by name (``masking.strategy`` in the config).

Every strategy has the signature ``fn(grid, ratio, inbox, inbox_ratio, generator) -> bool
(t*h*w,)`` (True = masked, token order t, h, w) and masks the same number of tokens for every
clip of a given grid and ratio, so clips batch together. Add a strategy by adding it to
:data:`MASKING_STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mofo.masking.grid import Grid, inbox_tokens, inbox_tubes, token_grid
from mofo.masking.mofo import inbox_quota, mofo_mask
from mofo.masking.tube import num_masked, tube_mask

MaskFn = Callable[[Grid, float, "np.ndarray | None", float, np.random.Generator], np.ndarray]


def _tube(
    grid: Grid,
    ratio: float,
    inbox: np.ndarray | None,
    inbox_ratio: float,
    generator: np.random.Generator,
) -> np.ndarray:
    return tube_mask(grid, ratio, generator)  # random tubes: the box is not used


def _mofo(
    grid: Grid,
    ratio: float,
    inbox: np.ndarray | None,
    inbox_ratio: float,
    generator: np.random.Generator,
) -> np.ndarray:
    if inbox is None:
        raise ValueError("masking strategy 'mofo' needs the clip's in-box token flags")
    return mofo_mask(grid, ratio, inbox, inbox_ratio, generator)


MASKING_STRATEGIES: dict[str, MaskFn] = {"tube": _tube, "mofo": _mofo}


def make_mask(
    strategy: str,
    grid: Grid,
    ratio: float,
    inbox: np.ndarray | None = None,
    inbox_ratio: float = 0.75,
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """The mask of one clip by strategy name; ``generator`` defaults to a fresh unseeded one."""
    if strategy not in MASKING_STRATEGIES:
        raise ValueError(
            f"unknown masking strategy {strategy!r}; choose one of {sorted(MASKING_STRATEGIES)}"
        )
    rng = generator if generator is not None else np.random.default_rng()
    return MASKING_STRATEGIES[strategy](grid, ratio, inbox, inbox_ratio, rng)


def mask_from_config(
    masking_cfg: Mapping[str, Any],
    grid: Grid,
    inbox: np.ndarray | None,
    generator: np.random.Generator,
) -> np.ndarray:
    """:func:`make_mask` with ``strategy``, ``ratio`` and ``inbox_ratio`` from ``masking``."""
    return make_mask(
        masking_cfg["strategy"],
        grid,
        float(masking_cfg["ratio"]),
        inbox,
        float(masking_cfg["inbox_ratio"]),
        generator,
    )


__all__ = [
    "MASKING_STRATEGIES",
    "Grid",
    "inbox_quota",
    "inbox_tokens",
    "inbox_tubes",
    "make_mask",
    "mask_from_config",
    "mofo_mask",
    "num_masked",
    "token_grid",
    "tube_mask",
]
