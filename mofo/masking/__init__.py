"""Masking strategies for pretraining, selected by name (``masking.strategy`` in the config).

Two kinds, one name space (:data:`STRATEGY_NAMES`):

* loader-side (:data:`MASKING_STRATEGIES`: ``tube``, ``mofo``): drawn per clip by the data
  loader, ``fn(grid, ratio, inbox, inbox_ratio, generator) -> bool (t*h*w,)`` (True = masked,
  token order t, h, w); the sample carries it as ``mask`` and every masked token is
  reconstructed;
* model-side (:data:`MODEL_SIDE_STRATEGIES`: ``everest``): chosen inside the training step
  from the model's patch embeddings, ``fn(embeddings (B, N, D), grid, masking_cfg,
  generator) -> (hidden, target)``, both bool ``(B, N)``: ``hidden`` = not an encoder input,
  ``target`` = reconstructed (a subset of ``hidden``; the rest of ``hidden`` is dropped).
  The loader gives no ``mask`` (:func:`mask_from_config` returns None).

Both give the same counts for every clip of a grid, so clips batch together. Add a strategy
by adding it to one of the two tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mofo.masking.grid import Grid, inbox_tokens, inbox_tubes, token_grid
from mofo.masking.mofo import inbox_quota, mofo_mask
from mofo.masking.tube import num_masked, tube_mask

if TYPE_CHECKING:
    import torch

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

# (embeddings (B, N, D), grid, masking section, torch generator or None) -> (hidden, target)
SelectFn = Callable[..., tuple["torch.Tensor", "torch.Tensor"]]


def _everest(
    embeddings: torch.Tensor,
    grid: Grid,
    masking_cfg: Mapping[str, Any],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from mofo.masking.everest import everest_masks, slice_distances  # torch: imported on use

    return everest_masks(
        slice_distances(embeddings, grid),
        float(masking_cfg["ratio"]),
        float(masking_cfg["everest"]["drop_ratio"]),
        generator,
    )


MODEL_SIDE_STRATEGIES: dict[str, SelectFn] = {"everest": _everest}

STRATEGY_NAMES: tuple[str, ...] = (*MASKING_STRATEGIES, *MODEL_SIDE_STRATEGIES)


def _check_name(strategy: str) -> None:
    if strategy not in STRATEGY_NAMES:
        raise ValueError(
            f"unknown masking strategy {strategy!r}; choose one of {sorted(STRATEGY_NAMES)}"
        )


def is_model_side(strategy: str) -> bool:
    """True when ``strategy`` is chosen inside the model (no loader mask)."""
    _check_name(strategy)
    return strategy in MODEL_SIDE_STRATEGIES


def select_from_config(
    masking_cfg: Mapping[str, Any],
    embeddings: torch.Tensor,
    grid: Grid,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, target)`` bool ``(B, N)`` of the model-side ``masking.strategy`` from the
    patch embeddings ``(B, N, D)`` (token order t, h, w); raises for a loader-side one."""
    strategy = masking_cfg["strategy"]
    if not is_model_side(strategy):
        raise ValueError(
            f"masking strategy {strategy!r} is drawn by the data loader (the sample's 'mask'), "
            "not selected from the embeddings"
        )
    return MODEL_SIDE_STRATEGIES[strategy](embeddings, grid, masking_cfg, generator)


def make_mask(
    strategy: str,
    grid: Grid,
    ratio: float,
    inbox: np.ndarray | None = None,
    inbox_ratio: float = 0.75,
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """The mask of one clip by strategy name; ``generator`` defaults to a fresh unseeded one.

    Only for loader-side strategies: a model-side one raises (it needs the embeddings)."""
    if is_model_side(strategy):
        raise ValueError(
            f"masking strategy {strategy!r} is selected inside the model from its patch "
            "embeddings (mofo.masking.select_from_config); the loader draws no mask for it"
        )
    rng = generator if generator is not None else np.random.default_rng()
    return MASKING_STRATEGIES[strategy](grid, ratio, inbox, inbox_ratio, rng)


def mask_from_config(
    masking_cfg: Mapping[str, Any],
    grid: Grid,
    inbox: np.ndarray | None,
    generator: np.random.Generator,
) -> np.ndarray | None:
    """:func:`make_mask` with ``strategy``, ``ratio`` and ``inbox_ratio`` from ``masking``;
    None for a model-side strategy (the model selects, the sample carries no mask)."""
    if is_model_side(masking_cfg["strategy"]):
        return None
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
    "MODEL_SIDE_STRATEGIES",
    "STRATEGY_NAMES",
    "Grid",
    "inbox_quota",
    "inbox_tokens",
    "inbox_tubes",
    "is_model_side",
    "make_mask",
    "mask_from_config",
    "mofo_mask",
    "num_masked",
    "select_from_config",
    "token_grid",
    "tube_mask",
]
