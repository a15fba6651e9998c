"""Masking strategies for pretraining, selected by name (``masking.strategy`` in the config).

Two kinds, one name space (:data:`STRATEGY_NAMES`):

* loader-side (:data:`MASKING_STRATEGIES`: ``tube``, ``mofo``, ``mgmae``): drawn per clip by
  the data loader, ``fn(grid, ratio, inbox, inbox_ratio, generator, *, token_flow=None,
  options=None) -> bool (t*h*w,)`` (True = masked, token order t, h, w); the sample carries it
  as ``mask`` and every masked token is reconstructed. The keyword arguments are what some
  strategies need beyond the box: ``token_flow``, the clip's flow at the token grid (float
  ``(frames-1, h, w, 2)`` in token cells, see :mod:`mofo.masking.mgmae`), for the strategies
  in :data:`FLOW_STRATEGIES`; ``options``, the strategy's own config section
  (``masking.<name>``) where it has one. A strategy raises a ``ValueError`` naming what it
  misses;
* model-side (:data:`MODEL_SIDE_STRATEGIES`: ``everest``): chosen inside the training step
  from the model's patch embeddings, ``fn(embeddings (B, N, D), grid, masking_cfg,
  generator) -> (hidden, target)``, both bool ``(B, N)``: ``hidden`` = not an encoder input,
  ``target`` = reconstructed (a subset of ``hidden``; the rest of ``hidden`` is dropped).
  The loader gives no ``mask`` (:func:`mask_from_config` returns None).

Both give the same counts for every clip of a grid, so clips batch together. Add a strategy
by adding it to one of the two tables (and to :data:`FLOW_STRATEGIES` if it reads the flow).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mofo.masking.grid import Grid, inbox_tokens, inbox_tubes, token_grid
from mofo.masking.mgmae import mgmae_mask
from mofo.masking.mofo import inbox_quota, mofo_mask
from mofo.masking.tube import num_masked, tube_mask

if TYPE_CHECKING:
    import torch

MaskFn = Callable[..., np.ndarray]


def _tube(
    grid: Grid,
    ratio: float,
    inbox: np.ndarray | None,
    inbox_ratio: float,
    generator: np.random.Generator,
    **_: Any,
) -> np.ndarray:
    return tube_mask(grid, ratio, generator)  # random tubes: the box is not used


def _mofo(
    grid: Grid,
    ratio: float,
    inbox: np.ndarray | None,
    inbox_ratio: float,
    generator: np.random.Generator,
    **_: Any,
) -> np.ndarray:
    if inbox is None:
        raise ValueError("masking strategy 'mofo' needs the clip's in-box token flags")
    return mofo_mask(grid, ratio, inbox, inbox_ratio, generator)


def _mgmae(
    grid: Grid,
    ratio: float,
    inbox: np.ndarray | None,
    inbox_ratio: float,
    generator: np.random.Generator,
    *,
    token_flow: np.ndarray | None = None,
    options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    if options is None:
        raise ValueError("masking strategy 'mgmae' needs its settings (the masking.mgmae section)")
    return mgmae_mask(grid, ratio, token_flow, options, generator)  # the box is not used


MASKING_STRATEGIES: dict[str, MaskFn] = {"tube": _tube, "mofo": _mofo, "mgmae": _mgmae}
#: Strategies that read the clip's flow at the token grid (``token_flow``).
FLOW_STRATEGIES = frozenset({"mgmae"})


def needs_token_flow(strategy: str) -> bool:
    """Whether ``strategy`` masks from the clip's flow (the loader then reads the pooled flow)."""
    return strategy in FLOW_STRATEGIES


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


def check_strategy(strategy: str) -> None:
    """Raise ValueError naming the registered strategies unless ``strategy`` is one. The
    registry is the one list of strategies: the schema checks only that the setting is a name,
    and the workflow calls this for every pretraining of the DAG when it starts."""
    if strategy not in STRATEGY_NAMES:
        raise ValueError(
            f"unknown masking strategy {strategy!r}; choose one of {sorted(STRATEGY_NAMES)}"
        )


def is_model_side(strategy: str) -> bool:
    """True when ``strategy`` is chosen inside the model (no loader mask)."""
    check_strategy(strategy)
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
    *,
    token_flow: np.ndarray | None = None,
    options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The mask of one clip by strategy name; ``generator`` defaults to a fresh unseeded one.
    ``token_flow`` and ``options``: see the module docstring. Only for loader-side
    strategies: a model-side one raises (it needs the embeddings)."""
    if is_model_side(strategy):
        raise ValueError(
            f"masking strategy {strategy!r} is selected inside the model from its patch "
            "embeddings (mofo.masking.select_from_config); the loader draws no mask for it"
        )
    rng = generator if generator is not None else np.random.default_rng()
    return MASKING_STRATEGIES[strategy](
        grid, ratio, inbox, inbox_ratio, rng, token_flow=token_flow, options=options
    )


def mask_from_config(
    masking_cfg: Mapping[str, Any],
    grid: Grid,
    inbox: np.ndarray | None,
    generator: np.random.Generator,
    token_flow: np.ndarray | None = None,
) -> np.ndarray | None:
    """:func:`make_mask` with ``strategy``, ``ratio`` and ``inbox_ratio`` from ``masking``, and
    the strategy's own section ``masking.<strategy>`` as its options where there is one; None
    for a model-side strategy (the model selects, the sample carries no mask)."""
    strategy = masking_cfg["strategy"]
    if is_model_side(strategy):
        return None
    return make_mask(
        strategy,
        grid,
        float(masking_cfg["ratio"]),
        inbox,
        float(masking_cfg["inbox_ratio"]),
        generator,
        token_flow=token_flow,
        options=masking_cfg[strategy] if strategy in masking_cfg else None,
    )


__all__ = [
    "FLOW_STRATEGIES",
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
    "mgmae_mask",
    "mofo_mask",
    "needs_token_flow",
    "num_masked",
    "select_from_config",
    "token_grid",
    "tube_mask",
]
