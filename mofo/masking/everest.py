"""EVEREST / VideoMS motion-centric token selection (arXiv 2211.10636), computed online.

Unlike the tube and MOFO masks, this selection is not drawn by the data loader: it ranks the
tokens of each clip by how much the model's own patch embedding (the Conv3d tubelet
embedding, before the position table) changes over time, so it is computed inside the
training step from the embeddings (``mofo.masking.select_from_config``).

Token importance (:func:`slice_distances`): for the token of spatial cell ``c`` in temporal
slice ``i`` (tubelet ``i``), the L2 distance between the embeddings of cell ``c`` in slices
``i`` and ``i - 1``; slice 0 has no previous slice and takes the distance of slices 0 -> 1,
i.e. the same value as slice 1 (the published rule). Any number of slices ``t >= 2``.

Pretraining split (:func:`everest_masks`), per clip of ``N`` tokens, exact counts so that
clips batch: the ``n_drop = round(drop_ratio * N)`` lowest-distance tokens are DROPPED
(neither encoded nor reconstructed); of the rest, ``n_visible = N - round(ratio * N)`` drawn
uniformly are the encoder's input and the others (``n_target = round(ratio * N) - n_drop``)
are reconstructed. Published values (UCF101 script, docs/peers): ``ratio`` 0.9,
``drop_ratio`` 0.7, i.e. 10 % visible, 20 % reconstructed, 70 % dropped. Ties in distance
(e.g. identical static cells) are broken at random, not by token index.

Fine-tuning (:func:`motion_drop_mask`): the ``round(drop_ratio * N)`` lowest-distance
tokens are dropped before the encoder (published ``mcm_ratio`` 0.4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mofo.masking.grid import Grid
from mofo.masking.tube import num_masked


def slice_distances(embeddings: Tensor, grid: Grid) -> Tensor:
    """float32 ``(B, t*h*w)`` motion score of every token (token order t, h, w).

    ``embeddings``: ``(B, t*h*w, D)`` tubelet embeddings in token order. Score of slice
    ``i >= 1``: ``||e[i, c] - e[i-1, c]||_2``; slice 0 repeats slice 1's score (its distance
    to the next slice). Raises for fewer than 2 temporal slices (no motion to measure).
    """
    t, h, w = grid
    if embeddings.ndim != 3 or embeddings.shape[1] != t * h * w:
        raise ValueError(
            f"expected embeddings (B, {t * h * w}, D) for grid {grid}, got {tuple(embeddings.shape)}"
        )
    if t < 2:
        raise ValueError(
            f"EVEREST token selection needs at least 2 temporal slices, got grid {grid} "
            "(model.num_frames / model.tubelet_size)"
        )
    e = embeddings.detach().float().reshape(embeddings.shape[0], t, h * w, -1)
    step = (e[:, 1:] - e[:, :-1]).norm(dim=-1)  # (B, t-1, h*w): slice i vs i-1, i >= 1
    return torch.cat([step[:, :1], step], dim=1).reshape(embeddings.shape[0], -1)


def everest_counts(num_tokens: int, ratio: float, drop_ratio: float) -> tuple[int, int, int]:
    """``(n_drop, n_visible, n_target)`` per clip; they add up to ``num_tokens``.

    ``ratio``: fraction of all tokens the encoder does not see (dropped + reconstructed);
    ``drop_ratio``: fraction of all tokens dropped. Both rounded half up. Raises unless at
    least one token is visible and one reconstructed.
    """
    n_hidden = num_masked(num_tokens, ratio)
    n_drop = num_masked(num_tokens, drop_ratio)
    n_visible, n_target = num_tokens - n_hidden, n_hidden - n_drop
    if n_visible < 1 or n_target < 1:
        raise ValueError(
            f"masking.everest: with masking.ratio {ratio} and drop_ratio {drop_ratio} a clip of "
            f"{num_tokens} tokens has {n_visible} visible and {n_target} reconstructed tokens; "
            "both must be >= 1 (drop_ratio < ratio < 1)"
        )
    return n_drop, n_visible, n_target


def rank_ascending(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """long ``(B, N)``: token indices of each row by ascending score, ties in random order."""
    noise = torch.rand(scores.shape, generator=generator, device=scores.device)
    shuffle = noise.argsort(dim=1)
    order = scores.gather(1, shuffle).argsort(dim=1, stable=True)
    return shuffle.gather(1, order)


def everest_masks(
    scores: Tensor, ratio: float, drop_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(hidden, target)``, both bool ``(B, N)``, from the motion scores ``(B, N)``.

    ``hidden``: True = not an encoder input (dropped or reconstructed); ``target``: True =
    reconstructed (decoder output, loss). Dropped = ``hidden & ~target``: the
    :func:`everest_counts` lowest-score tokens. Visible tokens are a uniform draw among the
    kept ones (``generator``: torch's global one when None).
    """
    b, n = scores.shape
    n_drop, n_visible, _ = everest_counts(n, ratio, drop_ratio)
    order = rank_ascending(scores, generator)
    kept = order[:, n_drop:]  # (B, N - n_drop) most-moving tokens
    pick = torch.rand(kept.shape, generator=generator, device=scores.device).argsort(dim=1)
    visible_idx = kept.gather(1, pick[:, :n_visible])
    rows = torch.arange(b, device=scores.device)[:, None]
    hidden = torch.ones(b, n, dtype=torch.bool, device=scores.device)
    hidden[rows, visible_idx] = False
    target = hidden.clone()
    target[rows, order[:, :n_drop]] = False
    return hidden, target


def motion_drop_mask(
    scores: Tensor, drop_ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """bool ``(B, N)``, True = dropped: the ``round(drop_ratio * N)`` lowest-score tokens of
    each row (fine-tuning). Raises when nothing would be kept."""
    b, n = scores.shape
    n_drop = num_masked(n, drop_ratio)
    if n_drop >= n:
        raise ValueError(f"drop ratio {drop_ratio} would drop all {n} tokens of a clip")
    dropped = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    rows = torch.arange(b, device=scores.device)[:, None]
    dropped[rows, rank_ascending(scores, generator)[:, :n_drop]] = True
    return dropped
