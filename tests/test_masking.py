"""Masking: exact counts, in-box share, token order, and in-box tokens against a pixel check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mofo.config import load_config
from mofo.masking import (
    MASKING_STRATEGIES,
    inbox_tokens,
    inbox_tubes,
    make_mask,
    mask_from_config,
    num_masked,
    token_grid,
)

GRIDS = st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))
RATIOS = st.floats(0.0, 1.0, allow_nan=False)


def random_inbox(grid, rng, p):
    return rng.random(math.prod(grid)) < p


@settings(max_examples=200, deadline=None)
@given(grid=GRIDS, ratio=RATIOS, seed=st.integers(0, 2**32 - 1))
def test_tube_mask_counts_and_tubes(grid, ratio, seed):
    t, h, w = grid
    mask = make_mask("tube", grid, ratio, generator=np.random.default_rng(seed))
    assert mask.dtype == bool and mask.shape == (t * h * w,)
    slices = mask.reshape(t, h * w)
    assert (slices == slices[0]).all()  # the same spatial mask in every temporal slice
    # Independent of num_masked: round half up, never more than the tubes there are.
    assert slices[0].sum() == min(h * w, math.floor(ratio * (h * w) + 0.5))


@settings(max_examples=300, deadline=None)
@given(
    grid=GRIDS,
    ratio=RATIOS,
    inbox_ratio=RATIOS,
    p_in=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_mofo_mask_counts_and_inbox_share(grid, ratio, inbox_ratio, p_in, seed):
    t, h, w = grid
    rng = np.random.default_rng(seed)
    inbox = random_inbox(grid, rng, p_in)
    mask = make_mask("mofo", grid, ratio, inbox, inbox_ratio, rng)
    slices = mask.reshape(t, h * w)
    assert (slices == slices[0]).all()
    tubes = slices[0]
    n_mask = min(h * w, math.floor(ratio * (h * w) + 0.5))  # not from num_masked itself
    assert tubes.sum() == n_mask  # exactly, whatever the box
    tubes_in = inbox.reshape(t, h * w).any(0)
    quota = min(n_mask, math.floor(inbox_ratio * tubes_in.sum() + 1e-9))
    assert tubes[tubes_in].sum() >= quota  # the in-box quota is always masked


def test_mofo_quota_then_uniform_rest():
    """Quota first from the box, the rest uniform over all remaining tubes (statistically)."""
    grid = (2, 10, 10)
    inbox = np.zeros((2, 10, 10), bool)
    inbox[1, :4, :5] = True  # 20 in-box tubes (in the second slice only: any-time rule)
    inbox = inbox.reshape(-1)
    rng = np.random.default_rng(0)
    n_in = []
    for _ in range(2000):
        tubes = make_mask("mofo", grid, 0.5, inbox, 0.75, rng).reshape(2, 100)[0]
        n_in.append(tubes.reshape(10, 10)[:4, :5].sum())
    # 15 forced + 35 more from the 85 others, of which 5 in-box: mean 15 + 35 * 5 / 85.
    assert min(n_in) >= 15
    assert np.mean(n_in) == pytest.approx(15 + 35 * 5 / 85, abs=0.1)


def test_mofo_fills_from_box_when_outside_is_too_small():
    grid = (1, 4, 4)
    inbox = np.ones(16, bool)
    inbox[:2] = False
    mask = make_mask("mofo", grid, 0.9, inbox, 0.75, np.random.default_rng(1))
    assert mask.sum() == 14  # round(0.9 * 16) = round(14.4), the in-box tubes fill the rest


@pytest.mark.parametrize(
    "n, ratio, expected",
    [(16, 0.9, 14), (196, 0.9, 176), (64, 0.75, 48), (10, 0.25, 3), (10, 0.35, 4), (4, 0.5, 2),
     (5, 0.5, 3), (5, 0.0, 0), (5, 1.0, 5), (1, 0.49, 0), (1, 0.5, 1)],
)
def test_num_masked_pinned_values(n, ratio, expected):
    """Written out by hand: round(ratio * n) with halves up (2.5 -> 3, not banker's 2)."""
    assert num_masked(n, ratio) == expected


@pytest.mark.parametrize("strategy", ["tube", "mofo"])
def test_pinned_mask_counts_on_a_4x4x4_grid(strategy):
    """4 slices of 4x4 tubes at ratio 0.9: 14 of 16 tubes masked, 14 x 4 = 56 tokens."""
    inbox = np.arange(64) % 5 == 0
    for seed in range(20):
        mask = make_mask(strategy, (4, 4, 4), 0.9, inbox, 0.75, np.random.default_rng(seed))
        assert mask.shape == (64,) and mask.sum() == 56
        assert (mask.reshape(4, 16).sum(1) == 14).all()


def test_same_count_for_every_clip_in_a_batch():
    grid = (8, 8, 8)
    rng = np.random.default_rng(3)
    counts = set()
    for i in range(50):
        boxes = np.tile(rng.uniform(0, 64, 4), (16, 1))
        boxes[:, 2:] = boxes[:, :2] + rng.uniform(0, 40, 2)
        inbox = inbox_tokens(boxes, 16, 64, 8, 2)
        strategy = "mofo" if i % 2 else "tube"
        counts.add(int(make_mask(strategy, grid, 0.9, inbox, 0.75, rng).sum()))
    assert counts == {58 * 8}


def test_seeded_generator_is_reproducible():
    grid, inbox = (4, 6, 6), np.arange(144) % 3 == 0
    a = make_mask("mofo", grid, 0.75, inbox, 0.75, np.random.default_rng(7))
    b = make_mask("mofo", grid, 0.75, inbox, 0.75, np.random.default_rng(7))
    assert (a == b).all()


def test_registry_and_config():
    cfg = load_config()
    assert set(MASKING_STRATEGIES) >= {"tube", "mofo"}
    model = cfg["model"]
    grid = token_grid(model)
    side = model["input_size"] // model["patch_size"]
    assert grid == (model["num_frames"] // model["tubelet_size"], side, side)
    inbox = np.zeros(math.prod(grid), bool)
    mask = mask_from_config(cfg["masking"], grid, inbox, np.random.default_rng(0))
    # Default (demo) model: 8 frames / tubelet 2 = 4 slices of (32 / 8)^2 = 16 tubes, ratio
    # 0.9: round(14.4) = 14 tubes per slice, 4 x 14 = 56 tokens.
    assert (grid, cfg["masking"]["ratio"]) == ((4, 4, 4), 0.9)
    assert mask.sum() == 56
    with pytest.raises(ValueError, match="unknown masking strategy"):
        make_mask("random", grid, 0.9)
    with pytest.raises(ValueError, match="in-box"):
        make_mask("mofo", grid, 0.9, None)
    with pytest.raises(ValueError, match="multiple"):
        token_grid({"input_size": 60, "patch_size": 8, "num_frames": 16, "tubelet_size": 2})


def brute_force_inbox(boxes, num_frames, size, patch, tubelet):
    """Pixel by pixel: a pixel [k, k+1) is in a box [x1, x2) when the intervals overlap."""
    t, s = num_frames // tubelet, size // patch
    out = np.zeros((t, s, s), bool)
    for f, (x1, y1, x2, y2) in enumerate(boxes):
        if not np.isfinite([x1, y1, x2, y2]).all() or x2 <= x1 or y2 <= y1:
            continue  # no box in this frame, or an empty one
        for y in range(size):
            for x in range(size):
                if x1 < x + 1 and x2 > x and y1 < y + 1 and y2 > y:
                    out[f // tubelet, y // patch, x // patch] = True
    return out.reshape(-1)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    patch=st.sampled_from([2, 3, 4]),
    side=st.integers(1, 5),
    tubelet=st.integers(1, 3),
    t=st.integers(1, 3),
    integer=st.booleans(),
)
def test_inbox_tokens_matches_pixel_check(data, patch, side, tubelet, t, integer):
    size, frames = patch * side, tubelet * t
    coord = (
        st.integers(-3, size + 3) if integer else st.floats(-3, size + 3, allow_nan=False)
    ).map(float)
    boxes = np.array([[data.draw(coord) for _ in range(4)] for _ in range(frames)])
    if data.draw(st.booleans()):
        boxes[data.draw(st.integers(0, frames - 1))] = np.nan  # a frame without a box
    got = inbox_tokens(boxes, frames, size, patch, tubelet)
    assert (got == brute_force_inbox(boxes, frames, size, patch, tubelet)).all()


def test_inbox_tokens_order_and_any_frame():
    # 4 frames, tubelet 2, 16 px crop, patch 8: grid (2, 2, 2)
    boxes = np.array(
        [
            [0, 0, 1, 1],  # frame 0: cell (0, 0)
            [0, 0, 0, 0],  # frame 1: empty
            [0, 0, 0, 0],  # frame 2: empty
            [9, 0, 16, 8],
        ],  # frame 3: cell (row 0, col 1)
        dtype=float,
    )
    got = inbox_tokens(boxes, 4, 16, 8, 2)
    assert got.tolist() == [True, False, False, False, False, True, False, False]
    assert inbox_tubes(got, (2, 2, 2)).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="one box per frame"):
        inbox_tokens(boxes[:3], 4, 16, 8, 2)


# ------------------------------------------------------- tube masking is uniform over the tubes
def tube_uniformity_p_value(draw_mask, grid=(2, 4, 6), ratio=0.5, draws=20_000) -> float:
    """p-value that every tube is masked equally often over ``draws`` masks of ``draw_mask``.

    Each mask hides exactly k of the n = h*w tubes, so a tube's count is Binomial(draws, k/n)
    and the counts always sum to draws*k: on that subspace the covariance is
    draws*p*(1-p)*n/(n-1) times the identity, and the scaled squared deviations follow a
    chi-square with n-1 degrees of freedom."""
    from scipy.stats import chi2

    t, h, w = grid
    n = h * w
    counts = np.zeros(n)
    for _ in range(draws):
        mask = draw_mask(grid, ratio).reshape(t, n)
        assert (mask == mask[0]).all()  # a tube is masked in every slice or none
        counts += mask[0]
    k = num_masked(n, ratio)
    p = k / n
    stat = ((counts - draws * p) ** 2).sum() * (n - 1) / (draws * p * (1 - p) * n)
    return float(chi2.sf(stat, n - 1))


P_MIN = 1e-4  # fixed seeds below: deterministic; a fair generator falls below 1e-4 1 in 10^4


def test_tube_masking_masks_every_tube_with_equal_probability():
    rng = np.random.default_rng(2024)
    assert tube_uniformity_p_value(lambda grid, ratio: make_mask("tube", grid, ratio, None, 0,
                                                                 rng)) > P_MIN


def test_tube_uniformity_check_rejects_a_biased_generator():
    """The check above can fail: tubes drawn with weights 1.1 for the first and 1 for the
    rest (a few percent more often) give a p-value far below the threshold."""
    from mofo.masking.tube import tubes_to_tokens

    rng = np.random.default_rng(2024)

    def biased(grid, ratio):
        n = grid[1] * grid[2]
        weights = np.ones(n)
        weights[0] = 1.1
        tubes = np.zeros(n, bool)
        tubes[rng.choice(n, num_masked(n, ratio), replace=False, p=weights / weights.sum())] = True
        return tubes_to_tokens(tubes, grid)

    assert tube_uniformity_p_value(biased) < P_MIN
