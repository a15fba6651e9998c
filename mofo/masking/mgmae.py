"""MGMAE's motion-guided masking (Huang et al., ICCV 2023), driven by mofo's stored flow.

A visibility map is drawn on one base frame of the clip as a mixture of Gaussians at random
token cells, carried to every other frame along the clip's optical flow (backward in time for
the frames before the base, forward in time after it), summed over the frames of each tubelet,
and in every temporal slice the ``n_visible = h*w - round(ratio*h*w)`` best cells are visible;
the rest is masked. The visible region therefore follows the moving content through time
instead of standing still like a tube. Every slice hides the same number of tokens as tube
masking, so a clip hides ``t * round(ratio*h*w)`` tokens whatever its motion.

Everything happens on the token grid (MGMAE draws and warps a pixel map and sums it over each
patch): cell ``(r, c)`` is token row ``r``, column ``c``; its centre is the point ``(r, c)``
of the continuous grid and it covers ``[r-0.5, r+0.5) x [c-0.5, c+0.5)``.

Flow contract: ``token_flow`` is float ``(F-1, h, w, 2)``: entry ``[f, r, c]`` is the
displacement ``(dx, dy)``, in token cells, of the content at cell ``(r, c)`` of frame ``f``
between frame ``f`` and frame ``f+1`` of the sampled clip (``F = t * tubelet`` frames).

Warping (base frame ``b``, :func:`base_coordinates`): every cell of every frame is traced back
to the point of the base frame its content comes from, and the base map is evaluated there.

* ``f < b``: the content at ``p`` of frame ``f`` is at ``p + d_f(p)`` in frame ``f+1``
  (backward warping: exact with the forward flow);
* ``f > b``: the content at ``q`` of frame ``f`` came from the ``p`` with
  ``p + d_{f-1}(p) = q``, solved by a fixed-point iteration (the stored flow is forward only;
  one step is exact for a translation);
* a cell whose source lies outside the frame (content that entered it) takes the base map's
  value at that cell (MGMAE's ``hole_filling: consist``).

Points are carried, not maps: the map is the Gaussian mixture evaluated at the carried point,
so it stays sharp however far it travels (resampling a map frame after frame blurs it).
Values between cell centres are bilinear; the flow is read with its edge values beyond the
outermost centres.

Where this differs from MGMAE's released code (docs/METHODS.md "MGMAE masking"): their
frames before the base are warped with the flow of the wrong direction (a ``'backwarp'``
typo leaves the frame order unswapped), so there the visible region moves against the
motion; here both directions follow it. Their flow is RAFT-small on the augmented clip,
computed in the training step; here it is the pipeline's stored flow, pooled and cropped.
Their map lives on pixels and a token's score is the sum over its pixels; here it lives on
token cells. They mask ``int(ratio*h*w)`` cells per slice; here ``round``, as tube masking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mofo.masking.grid import Grid
from mofo.masking.tube import num_masked

BASE_FRAMES = ("middle", "first", "random")
COMBINE = ("max", "sum")
INVERSE_ITERATIONS = 3  # fixed-point steps that invert the forward flow (exact for a translation)


def bilinear_sample(
    field: np.ndarray, y: np.ndarray, x: np.ndarray, extrapolate: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``field`` ``(H, W)`` or ``(H, W, C)`` at continuous cell coordinates.

    Returns ``(values, inside)``: values bilinear between cell centres; beyond the outermost
    centres the edge value (``extrapolate=False``) or the edge cells' linear trend
    (``extrapolate=True``, for coordinate fields, which stay exact for an affine field);
    ``inside`` is bool, True where ``(y, x)`` lies in the field's area
    ``[-0.5, H-0.5] x [-0.5, W-0.5]``. Points outside it are read as at its edge.
    """
    height, width = field.shape[:2]
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    inside = (y >= -0.5) & (y <= height - 0.5) & (x >= -0.5) & (x <= width - 0.5)
    pad = 0.5 if extrapolate else 0.0
    # np.minimum / np.maximum: np.clip's wrapper costs more than the arithmetic on small grids
    yc = np.minimum(np.maximum(y, -pad), height - 1 + pad)
    xc = np.minimum(np.maximum(x, -pad), width - 1 + pad)
    y0 = np.minimum(np.maximum(np.floor(yc), 0), max(height - 2, 0)).astype(np.intp)
    x0 = np.minimum(np.maximum(np.floor(xc), 0), max(width - 2, 0)).astype(np.intp)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy, wx = yc - y0, xc - x0  # a one-cell axis reads the same cell twice: any weight is exact
    flat = field.reshape(height * width, *field.shape[2:])
    if field.ndim == 3:
        wy, wx = wy[..., None], wx[..., None]
    top = flat[y0 * width + x0] * (1 - wx) + flat[y0 * width + x1] * wx
    bottom = flat[y1 * width + x0] * (1 - wx) + flat[y1 * width + x1] * wx
    return top * (1 - wy) + bottom * wy, inside


def gaussian_mixture(
    y: np.ndarray, x: np.ndarray, centres: np.ndarray, sigma: float, combine: str
) -> np.ndarray:
    """The mixture at continuous cell coordinates ``(y, x)``: Gaussians
    ``exp(-d^2 / (2 sigma^2))`` (``d``, ``sigma`` in cells, peak 1) at the ``(K, 2)`` centres
    ``(row, col)``, combined by ``max`` or ``sum``."""
    if sigma <= 0:
        raise ValueError(f"masking.mgmae.sigma must be > 0 cells, got {sigma}")
    if combine not in COMBINE:
        raise ValueError(f"masking.mgmae.combine must be one of {COMBINE}, got {combine!r}")
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    d2 = (y[None] - centres[:, 0].reshape((-1,) + (1,) * y.ndim)) ** 2 + (
        x[None] - centres[:, 1].reshape((-1,) + (1,) * x.ndim)
    ) ** 2
    if combine == "max":  # the largest bump is the nearest centre's: one exp per point
        return np.exp(-d2.min(0) / (2.0 * sigma**2))
    return np.exp(-d2 / (2.0 * sigma**2)).sum(0)


def _source_of(flow: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the content at ``(rows, cols)`` of the next frame came from: ``p`` with
    ``p + flow(p) = q`` (fixed-point iteration from ``q - flow(q)``)."""
    py, px = rows, cols
    for _ in range(INVERSE_ITERATIONS):
        d, _ = bilinear_sample(flow, py, px)
        py, px = rows - d[..., 1], cols - d[..., 0]
    return py, px


def base_coordinates(token_flow: np.ndarray, base: int) -> np.ndarray:
    """float64 ``(F, h, w, 2)``: for every cell of every frame, the point ``(row, col)`` of the
    base frame its content comes from, followed along ``token_flow`` (module docstring:
    backward in time before ``base``, forward after it). A cell whose content entered the
    frame (source outside) gets its own position: the base map's value there (hole filling).

    Carrying coordinates and evaluating the map once (:func:`gaussian_mixture`) keeps the
    Gaussians sharp; resampling the map frame after frame would blur it at every step.
    """
    n_frames, h, w = token_flow.shape[0] + 1, token_flow.shape[1], token_flow.shape[2]
    if not 0 <= base < n_frames:
        raise ValueError(f"base frame {base} outside the clip's {n_frames} frames")
    own = np.stack(np.mgrid[0:h, 0:w].astype(np.float64), axis=-1)  # (h, w, 2) row, col
    rows, cols = own[..., 0], own[..., 1]
    coords = np.empty((n_frames, h, w, 2))
    coords[base] = own
    for f in range(base - 1, -1, -1):  # earlier frames: where their content moves to
        d = token_flow[f]
        values, inside = bilinear_sample(coords[f + 1], rows + d[..., 1], cols + d[..., 0], True)
        coords[f] = np.where(inside[..., None], values, own)
    for f in range(base + 1, n_frames):  # later frames: where their content came from
        py, px = _source_of(token_flow[f - 1], rows, cols)
        values, inside = bilinear_sample(coords[f - 1], py, px, True)
        coords[f] = np.where(inside[..., None], values, own)
    return coords


def mgmae_scores(
    grid: Grid, token_flow: np.ndarray, centres: np.ndarray, sigma: float, combine: str, base: int
) -> np.ndarray:
    """float64 ``(t, h*w)``: each token's visibility score, the base-frame mixture at the
    base coordinates of its cell, summed over the frames of its tubelet, scaled so the base
    frame's best cell is 1."""
    t, h, w = grid
    n_frames = token_flow.shape[0] + 1
    coords = base_coordinates(token_flow, base)
    maps = gaussian_mixture(coords[..., 0], coords[..., 1], centres, sigma, combine)
    maps /= maps[base].max()
    return maps.reshape(t, n_frames // t, h * w).sum(1)


def base_frame_index(choice: str, n_frames: int, generator: np.random.Generator) -> int:
    """The base frame: ``middle`` (``F // 2``, MGMAE's), ``first`` or ``random`` (uniform)."""
    if choice == "middle":
        return n_frames // 2
    if choice == "first":
        return 0
    if choice == "random":
        return int(generator.integers(n_frames))
    raise ValueError(f"masking.mgmae.base_frame must be one of {BASE_FRAMES}, got {choice!r}")


def top_cells(scores: np.ndarray, n_visible: int, generator: np.random.Generator) -> np.ndarray:
    """bool like ``scores`` ``(t, n)``: the ``n_visible`` highest scores of each row, equal
    scores ordered at random."""
    tie_break = generator.random(scores.shape)
    order = np.lexsort((tie_break, -scores), axis=-1)
    visible = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(visible, order[:, :n_visible], True, axis=-1)
    return visible


def check_token_flow(token_flow: Any, grid: Grid) -> np.ndarray:
    """``token_flow`` as float64 ``(F-1, h, w, 2)`` with ``F`` a positive multiple of ``t``;
    the error names what is wrong."""
    t, h, w = grid
    if token_flow is None:
        raise ValueError(
            "masking strategy 'mgmae' needs the clip's flow at the token grid (token_flow, "
            f"(frames-1, {h}, {w}, 2) in token cells); the loader reads it from "
            "flow/shard-XXXX.pooled.npz, written by the optical_flow rule"
        )
    flow = np.asarray(token_flow, dtype=np.float64)
    n_frames = flow.shape[0] + 1 if flow.ndim == 4 else 0
    if flow.ndim != 4 or flow.shape[1:] != (h, w, 2) or n_frames % t:
        raise ValueError(
            f"token_flow must have shape (frames-1, {h}, {w}, 2) with frames a multiple of "
            f"the {t} temporal slices, got {flow.shape}"
        )
    if not np.isfinite(flow).all():
        raise ValueError("token_flow has non-finite values")
    return flow


def mgmae_mask(
    grid: Grid,
    ratio: float,
    token_flow: Any,
    options: Mapping[str, Any],
    generator: np.random.Generator,
) -> np.ndarray:
    """bool ``(t*h*w,)``, True = masked, ``t * round(ratio*h*w)`` tokens, the same number in
    every slice. ``options``: the ``masking.mgmae`` section (``num_gaussians`` (0 = one per
    visible cell, MGMAE's), ``sigma`` (cells), ``combine``, ``base_frame``)."""
    _, h, w = grid
    flow = check_token_flow(token_flow, grid)
    n_frames = flow.shape[0] + 1
    n_visible = h * w - num_masked(h * w, ratio)
    n_gauss = int(options["num_gaussians"]) or max(n_visible, 1)
    if not 0 < n_gauss <= h * w:
        raise ValueError(f"masking.mgmae.num_gaussians must be in [0, {h * w}] cells, got {n_gauss}")
    cells = generator.choice(h * w, size=n_gauss, replace=False)
    centres = np.stack([cells // w, cells % w], axis=1)
    base = base_frame_index(str(options["base_frame"]), n_frames, generator)
    scores = mgmae_scores(grid, flow, centres, float(options["sigma"]), str(options["combine"]), base)
    return ~top_cells(scores, n_visible, generator).reshape(-1)
