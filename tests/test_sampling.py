"""Temporal clip sampling (mofo.inputs.sampling)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mofo.inputs import sampling as S


def test_dense_train_window_is_strided_and_inside():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(300):
        idx = S.sample_clip_indices(40, 8, 2, rng, mode="train")
        assert idx.dtype == np.int64 and idx.shape == (8,)
        np.testing.assert_array_equal(np.diff(idx), 2)
        assert idx[0] >= 0 and idx[-1] <= 39
        starts.add(int(idx[0]))
    assert starts == set(range(40 - 15 + 1))  # every start 0..25 is used


def test_dense_test_window_is_centred():
    np.testing.assert_array_equal(S.sample_clip_indices(20, 4, 2, mode="test"), [6, 8, 10, 12])


def test_short_clip_fallback_squeezes_and_repeats():
    # window spans 15 frames, clip has 10: evenly spaced over the whole clip
    np.testing.assert_array_equal(S.sample_clip_indices(10, 8, 2, np.random.default_rng(0)),
                                  np.round(np.linspace(0, 9, 8)).astype(int))
    # fewer frames than num_frames: frames repeat, order kept
    idx = S.sample_clip_indices(3, 8, 1, np.random.default_rng(0))
    assert idx.min() == 0 and idx.max() == 2 and (np.diff(idx) >= 0).all()
    np.testing.assert_array_equal(S.sample_clip_indices(1, 4, 2, mode="test"), [0, 0, 0, 0])


def test_segment_train_one_frame_per_segment():
    rng = np.random.default_rng(1)
    seen = np.zeros(24, dtype=bool)
    for _ in range(200):
        idx = S.segment_indices(24, 8, rng, mode="train")
        # segment i is frames 3i .. 3i+2
        np.testing.assert_array_equal(idx // 3, np.arange(8))
        seen[idx] = True
    assert seen.all()


def test_segment_test_is_middle():
    np.testing.assert_array_equal(S.segment_indices(24, 8, mode="test"), np.arange(8) * 3 + 1)
    # 5 frames, 8 segments of 0.625: midpoints 0.31, 0.94, 1.56, 2.19, 2.81, 3.44, 4.06, 4.69
    np.testing.assert_array_equal(S.segment_indices(5, 8, mode="test"), [0, 0, 1, 2, 2, 3, 4, 4])


def test_test_views_dense_evenly_spaced():
    views = S.test_views(50, 8, 2, 3, "dense")
    assert views.shape == (3, 8)
    np.testing.assert_array_equal(views[:, 0], [0, 18, 35])  # span 15, last start 35
    np.testing.assert_array_equal(S.test_views(50, 8, 2, 1, "dense")[0], S.sample_clip_indices(50, 8, 2, mode="test"))
    short = S.test_views(5, 8, 2, 2, "dense")
    np.testing.assert_array_equal(short[0], short[1])


def test_test_views_segment_offsets():
    views = S.test_views(40, 4, 1, 2, "segment")
    # segments of 10 frames; positions 0.25 and 0.75
    np.testing.assert_array_equal(views, [[2, 12, 22, 32], [7, 17, 27, 37]])
    np.testing.assert_array_equal(S.test_views(40, 4, 1, 1, "segment")[0], [5, 15, 25, 35])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least one frame"):
        S.sample_clip_indices(0, 8, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs an rng"):
        S.segment_indices(10, 4)
    with pytest.raises(ValueError, match="scheme"):
        S.test_views(10, 4, 1, 2, "uniform")
    with pytest.raises(ValueError, match="mode"):
        S.sample_clip_indices(10, 4, 1, np.random.default_rng(0), mode="val")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 300), st.integers(1, 32), st.integers(1, 4), st.integers(0, 2**32 - 1),
    st.sampled_from(["dense", "segment"]),
)
def test_indices_always_valid_sorted_and_reproducible(n, t, rate, seed, scheme):
    idx = S.train_indices(n, t, rate, np.random.default_rng(seed), scheme)
    assert idx.shape == (t,) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n
    assert (np.diff(idx) >= 0).all()
    np.testing.assert_array_equal(idx, S.train_indices(n, t, rate, np.random.default_rng(seed), scheme))
    if scheme == "dense" and n >= S.window_span(t, rate):
        np.testing.assert_array_equal(np.diff(idx), rate)
    views = S.test_views(n, t, rate, 2, scheme)
    assert views.shape == (2, t) and views.min() >= 0 and views.max() < n
