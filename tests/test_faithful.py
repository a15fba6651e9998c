"""The faithful mode (the authors' recipe, mofo/motion/faithful.py) on analytic flow fields
and hand-made maps: quantisation, window sum, per-component magnitudes, border, integer cut,
two-contour rule, fallbacks, clean-up, and the config switch."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mofo.config import REPO_ROOT, ConfigError, load_config
from mofo.motion.boundaries import motion_map_from_cfg
from mofo.motion.boxes import boxes_for_clip, centre_box
from mofo.motion.faithful import (
    AUTHORS,
    Recipe,
    dequantize_flow,
    faithful_box,
    faithful_motion_map,
    quantize_flow,
)

H, W = 240, 320  # SSV2's height: the authors' 8 px and sigma 30 hold as they are


def blobs(*rects: tuple[int, int, int, int, float]) -> np.ndarray:
    m = np.zeros((H, W), np.float32)
    for x1, y1, x2, y2, value in rects:
        m[y1:y2, x1:x2] = value
    return m


def contains(box, x, y) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


# --------------------------------------------------------------------------- flow and map


def test_quantisation_is_denseflows_and_its_error_is_half_a_level():
    f = np.linspace(-20, 20, 4001, dtype=np.float32)
    q = quantize_flow(f)
    assert q.dtype == np.uint8 and q[0] == 0 and q[-1] == 255
    assert quantize_flow(np.float32(0.0)) == 128  # 127.5 rounds half to even
    assert quantize_flow(np.array([-35.0, 50.0])).tolist() == [0, 255]  # saturated
    err = np.abs(dequantize_flow(q) - f)
    # Half a level (20 / 255 px), well inside the bound / 127.5 (one level).
    assert err.max() <= 20 / 255 + 1e-5
    assert err.max() > 0.9 * 20 / 255  # and the quantisation is really there
    assert 20 / 255 < AUTHORS.bound / 127.5


def translating_square(n: int = 12, speed: float = 2.0) -> np.ndarray:
    """Flow of a 40-px square moving ``speed`` px per frame to the right."""
    flow = np.zeros((n, H, W, 2), np.float32)
    for t in range(n):
        x0 = round(100 + speed * t)
        flow[t, 100:140, x0:x0 + 40, 0] = speed
    return flow


def reference_map(flow: np.ndarray, i: int, window: int = 8) -> np.ndarray:
    """Frame i's map written out with scipy: raw Prewitt of the quantised flow in levels,
    summed over frames i-4..i+3, u and v magnitudes averaged, 8-px border zeroed."""
    q = quantize_flow(flow).astype(np.float64) - 127.5
    frames = range(max(0, i - window // 2), min(len(flow), i - window // 2 + window))
    d = {k: 0.0 for k in ("ux", "uy", "vx", "vy")}
    for j in frames:
        for c, name in ((0, "u"), (1, "v")):
            d[name + "x"] = d[name + "x"] + ndimage.prewitt(q[j, :, :, c], axis=1)
            d[name + "y"] = d[name + "y"] + ndimage.prewitt(q[j, :, :, c], axis=0)
    m = (np.hypot(d["ux"], d["uy"]) + np.hypot(d["vx"], d["vy"])) / 2
    m[:8], m[-8:], m[:, :8], m[:, -8:] = 0, 0, 0, 0
    return m


def test_translating_square_map_is_the_window_sum_written_out():
    flow = translating_square()
    m = faithful_motion_map(flow)
    for i in (0, 5, 11):  # cut window at both ends, full window in the middle
        np.testing.assert_allclose(m[i], reference_map(flow, i), rtol=1e-5, atol=1e-3)


def test_window_sums_the_frames_instead_of_averaging():
    # A square whose flow stays put: every frame has the same boundaries, so the 8-frame sum
    # is 8 single frames (a mean would be 1), and 4 at the first frame (frames 0..3).
    flow = np.zeros((12, H, W, 2), np.float32)
    flow[:, 100:140, 100:140, 0] = 3.0
    m = faithful_motion_map(flow)
    single = faithful_motion_map(flow, Recipe(window=1))
    assert single[6].max() > 0
    np.testing.assert_allclose(m[6], 8 * single[6], rtol=1e-6)
    np.testing.assert_allclose(m[0], 4 * single[0], rtol=1e-6)
    # A 3-px step is 147 - 128 = 19 levels; raw Prewitt across it sums 3 rows: 57; u only,
    # so the mean of the two magnitudes is 28.5.
    assert int(quantize_flow(np.float32(3.0))) - int(quantize_flow(np.float32(0.0))) == 19
    assert single[6].max() == pytest.approx(3 * 19 / 2)


def test_magnitudes_are_per_component_and_averaged_not_eq1():
    # A rotation u = -w y, v = w x: |grad u| = |grad v| = 6 w levels (raw Prewitt), so their
    # mean is 6 w; Eq. 1 over all four derivatives would give sqrt(2) x 6 w. w = one uint8
    # level per px, centred between pixels, so that the quantised field is exactly linear.
    w = 40 / 255
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    flow = np.zeros((3, H, W, 2), np.float32)
    flow[..., 0] = -w * (ys - (H - 1) / 2)
    flow[..., 1] = w * (xs - (W - 1) / 2)
    m = faithful_motion_map(flow, Recipe(window=1))[1]
    inner = m[40:-40, 60:-60]  # |flow| < 20 px here: nothing clipped
    np.testing.assert_allclose(inner, 6.0, atol=1e-4)  # Eq. 1: 8.49


def test_border_is_zeroed_8px_at_240_and_scaled():
    flow = np.random.default_rng(0).normal(0, 2, (2, H, W, 2)).astype(np.float32)
    m = faithful_motion_map(flow)[0]
    assert not m[:8].any() and not m[:, -8:].any() and m[8:-8, 8:-8].all()
    small = faithful_motion_map(flow[:, ::2, ::2].copy())[0]  # 120 px high: 4 px
    assert not small[:4].any() and small[4:-4, 4:-4].all()


def test_method_faithful_reads_no_other_key():
    flow = translating_square(6)
    cfg = load_config()["motion_map"]
    a = motion_map_from_cfg(flow, dict(cfg, method="faithful", temporal_window=1, border=0))
    b = motion_map_from_cfg(flow, dict(cfg, method="faithful", temporal_window=8, border=30))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, faithful_motion_map(flow))


# --------------------------------------------------------------------------- boxes


def test_two_close_blobs_give_one_box_over_both():
    # Centres 145 px apart (< 0.4 x 400 px diagonal), far enough to stay two contours after
    # the sigma-30 blur (contour boxes x 0..117 and 159..249): the box spans both.
    box = faithful_box(blobs((40, 100, 80, 140, 20), (190, 105, 220, 135, 20)))
    assert contains(box, 60, 120) and contains(box, 205, 120)


def test_two_far_blobs_keep_only_the_largest():
    # Centres 245 px apart (> 160): the larger left blob alone.
    box = faithful_box(blobs((20, 100, 60, 140, 20), (270, 105, 300, 135, 20)))
    assert contains(box, 40, 120) and not contains(box, 285, 120)
    assert box[2] < 200


def test_integer_cut_at_one_level():
    # The same blob 10x weaker: after the sigma-30 blur its peak is under 1 level, so the
    # integer map is empty. A relative cut would find the same box for both.
    assert faithful_box(blobs((140, 100, 180, 140, 20))) is not None
    assert faithful_box(blobs((140, 100, 180, 140, 2))) is None


def clip_boxes(*frames: np.ndarray, boxes_cfg: dict | None = None):
    cfg = dict(boxes_cfg or load_config()["motion_boxes"], method="faithful")
    df = boxes_for_clip(np.stack(frames), len(frames), cfg)
    return [tuple(r) for r in df[["x1", "y1", "x2", "y2"]].to_numpy()], df["source"].tolist()


def test_no_contour_gives_centre_box_then_previous_box():
    empty, blob = blobs(), blobs((140, 100, 180, 140, 20))
    boxes, sources = clip_boxes(empty, blob, empty)
    assert sources == ["centre", "detected", "previous"]
    assert boxes[0] == centre_box(H, W) and boxes[2] == boxes[1] == faithful_box(blob)


def test_bad_boxes_take_the_next_frames_box_with_the_authors_limits():
    good = blobs((140, 100, 180, 140, 20))
    huge = blobs((40, 20, 280, 220, 50))
    tiny = blobs((150, 110, 160, 120, 70))
    wide = faithful_box(huge)
    small = faithful_box(tiny)
    assert wide[2] - wide[0] > 0.7 * W  # the premises: one too wide, one under 1 %
    assert (small[2] - small[0]) * (small[3] - small[1]) < 0.01 * H * W
    # A boxes section that would accept both: faithful does not read it.
    lax = dict(load_config()["motion_boxes"], max_width=1.0, max_height=1.0, min_area=0.0)
    boxes, sources = clip_boxes(huge, tiny, good, boxes_cfg=lax)
    assert sources == ["next", "next", "detected"]
    assert boxes == [faithful_box(good)] * 3


def test_static_clip_is_a_whole_clip_fallback():
    boxes, sources = clip_boxes(blobs(), blobs(), blobs())
    assert sources == ["clip_fallback"] * 3 and boxes == [centre_box(H, W)] * 3


# --------------------------------------------------------------------------- config switch


def test_faithful_overlay_loads_and_half_a_switch_is_refused():
    cfg = load_config([REPO_ROOT / "config" / "faithful.yaml"])
    assert cfg["motion_map"]["method"] == cfg["motion_boxes"]["method"] == "faithful"
    assert cfg["optical_flow"]["method"] == "tvl1" and cfg["optical_flow"]["bound"] == 20
    with pytest.raises(ConfigError, match="motion_boxes.method"):
        load_config([], {"motion_map": {"method": "faithful"}})
    with pytest.raises(ConfigError, match="motion_map.method"):
        load_config([], {"motion_boxes": {"method": "faithful"}})
    with pytest.raises(ConfigError, match="optical_flow"):  # the demo's DIS flow
        load_config([], {"motion_map": {"method": "faithful"},
                         "motion_boxes": {"method": "faithful"}})
