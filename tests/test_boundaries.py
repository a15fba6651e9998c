"""Motion boundaries (Eq. 1) against analytic flow fields, and the motion-map shard stage."""

from __future__ import annotations

import numpy as np
import pytest

from mofo.config import load_config
from mofo.motion.boundaries import (
    flow_magnitude_map,
    motion_boundaries,
    motion_map_from_cfg,
    motion_map_shard,
    scaled_border,
    temporal_window_mean,
)

H, W, T = 40, 50, 3


def grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    return x, y


def field(u: np.ndarray, v: np.ndarray, t: int = T) -> np.ndarray:
    """Same (u, v) for every flow frame: (t, H, W, 2)."""
    one = np.stack([np.broadcast_to(u, (H, W)), np.broadcast_to(v, (H, W))], axis=-1)
    return np.repeat(one[None], t, axis=0).astype(np.float32)


def interior(m: np.ndarray, margin: int = 2) -> np.ndarray:
    return m[:, margin:-margin, margin:-margin]


def test_pure_translation_gives_zero_away_from_the_border():
    m = motion_boundaries(field(np.full((H, W), 3.5), np.full((H, W), -1.25)))
    assert m.shape == (T, H, W) and m.dtype == np.float32
    np.testing.assert_allclose(interior(m, 1), 0.0, atol=1e-6)


def test_moving_region_is_zero_inside_and_nonzero_only_at_its_edges():
    u = np.zeros((H, W), np.float32)
    v = np.zeros((H, W), np.float32)
    u[10:30, 15:35] = 2.0  # a square translating right inside a static background
    v[10:30, 15:35] = 1.0
    m = motion_boundaries(field(u, v))[0]
    # (float rounding of the /6 kernel leaves ~1e-7)
    assert np.all(m[12:28, 17:33] < 1e-6)  # inside, one pixel away from the region's edge
    edges = np.zeros((H, W), bool)
    edges[9:31, 14:36] = True
    edges[11:29, 16:34] = False  # a two-pixel band around the region's outline
    assert np.all(m[~edges] < 1e-6)
    assert np.all(m[10, 16:34] > 0.1) and np.all(m[20, [14, 15, 34, 35]] > 0.1)


def test_shear_gives_abs_a():
    x, y = grid()
    a = -0.3
    m = motion_boundaries(field(a * y, np.zeros_like(x)))
    np.testing.assert_allclose(interior(m), abs(a), rtol=1e-5)


def test_rotation_gives_sqrt2_w():
    x, y = grid()
    w = 0.07
    m = motion_boundaries(field(-w * (y - H / 2), w * (x - W / 2)))
    np.testing.assert_allclose(interior(m), np.sqrt(2) * w, rtol=1e-5)


def test_zoom_gives_sqrt2_s():
    x, y = grid()
    s = 0.05
    m = motion_boundaries(field(s * (x - W / 2), s * (y - H / 2)))
    np.testing.assert_allclose(interior(m), np.sqrt(2) * s, rtol=1e-5)


def test_camera_pan_plus_object_ignores_the_pan_but_raw_flow_does_not():
    pan_u, pan_v = 4.0, -2.0
    u = np.full((H, W), pan_u, np.float32)
    v = np.full((H, W), pan_v, np.float32)
    u[15:25, 20:30] += 1.5  # the object moves relative to the panning background
    obj_only = np.zeros((H, W, 2), np.float32)
    obj_only[15:25, 20:30, 0] = 1.5
    with_pan = motion_boundaries(field(u, v), border=1, gaussian_sigma=1.0)
    without_pan = motion_boundaries(np.repeat(obj_only[None], T, 0), border=1, gaussian_sigma=1.0)
    np.testing.assert_allclose(with_pan, without_pan, atol=1e-5)
    raw = flow_magnitude_map(field(u, v), border=1)
    assert raw[0, 5, 5] == pytest.approx(np.hypot(pan_u, pan_v), rel=1e-5)  # pan everywhere


def test_border_is_zeroed_and_gaussian_smooths():
    x, y = grid()
    m = motion_boundaries(field(0.2 * y, np.zeros_like(x)), border=4, gaussian_sigma=0.0)
    assert np.all(m[:, :4] == 0) and np.all(m[:, -4:] == 0)
    assert np.all(m[:, :, :4] == 0) and np.all(m[:, :, -4:] == 0)
    assert np.all(m[:, 4:-4, 4:-4] > 0)
    spike = np.zeros((1, H, W, 2), np.float32)
    spike[0, 20, 25, 0] = 1.0
    sharp = motion_boundaries(spike)
    smooth = motion_boundaries(spike, gaussian_sigma=2.0)
    assert smooth.max() < sharp.max()
    assert smooth.sum() == pytest.approx(sharp.sum(), rel=1e-3)  # a low pass keeps the mass


def test_temporal_window_averages_derivatives_centred_on_the_frame():
    x = np.arange(6, dtype=np.float32).reshape(6, 1)
    np.testing.assert_allclose(temporal_window_mean(x, 1), x)
    # window 3: frames i-1..i+1 cut at the ends
    np.testing.assert_allclose(temporal_window_mean(x, 3)[:, 0], [0.5, 1, 2, 3, 4, 4.5])
    # window 4: frames i-2..i+1
    np.testing.assert_allclose(temporal_window_mean(x, 4)[:, 0], [0.5, 1, 1.5, 2.5, 3.5, 4])


def test_oscillating_shake_cancels_within_the_window():
    # The authors combine derivatives over the window before the magnitude: a shear that
    # flips sign every frame (camera shake of a slanted plane) averages out.
    x, y = grid()
    f = field(0.4 * y, np.zeros_like(x), t=12)
    f[1::2] *= -1
    m = motion_boundaries(f, temporal_window=8)
    assert interior(m)[4:9].max() < 1e-6  # frames whose window (i-4 .. i+3) is complete
    assert interior(motion_boundaries(f, temporal_window=1)).min() > 0.39


def test_zero_length_flow_gives_zero_length_map():
    m = motion_boundaries(np.zeros((0, 12, 16, 2), np.float32), temporal_window=8, border=2)
    assert m.shape == (0, 12, 16)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="flow must be"):
        motion_boundaries(np.zeros((3, 12, 16), np.float32))


def test_scaled_border():
    assert scaled_border(8, 240, 240) == 8
    assert scaled_border(8, 48, 240) == 2
    assert scaled_border(8, 10, 240) == 1  # never less than one pixel
    assert scaled_border(8, 48, 0) == 8
    assert scaled_border(0, 48, 240) == 0


def test_motion_map_shard_writes_float16_maps_and_raw_flow(tmp_path):
    cfg = load_config()["motion_map"]
    u = np.zeros((24, 32), np.float32)
    u[8:16, 10:20] = 2.0
    flows = {
        "clip_a": field_like(u, 5),
        "one_frame": np.zeros((0, 24, 32, 2), np.float16),
    }
    flow_path = tmp_path / "flow" / "shard-0000.npz"
    flow_path.parent.mkdir()
    np.savez(flow_path, **flows)
    out = tmp_path / "motion_map" / "shard-0000.npz"
    raw_out = tmp_path / "motion_map" / "shard-0000.rawflow.npz"
    result = motion_map_shard(flow_path, out, cfg, raw_flow_out=raw_out)
    assert result == {"clips": 2, "failed": []}
    with np.load(out) as maps, np.load(raw_out) as raw:
        assert sorted(maps.files) == ["clip_a", "one_frame"] == sorted(raw.files)
        assert maps["clip_a"].dtype == np.float16 and maps["clip_a"].shape == (5, 24, 32)
        assert maps["one_frame"].shape == (0, 24, 32)
        expected = motion_map_from_cfg(flows["clip_a"].astype(np.float32), cfg)
        np.testing.assert_allclose(
            maps["clip_a"].astype(np.float32), expected, rtol=1e-2, atol=1e-3
        )
        assert raw["clip_a"].max() > 1.0  # flow magnitude, not boundaries
    assert not list(out.parent.glob("*.tmp"))


def field_like(u: np.ndarray, t: int) -> np.ndarray:
    f = np.zeros((t,) + u.shape + (2,), np.float16)
    f[..., 0] = u
    return f
