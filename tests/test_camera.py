"""Camera-motion cancellation, texture confidence and the mass box, on analytic flows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mofo.config import load_config
from mofo.motion.boundaries import motion_map_from_cfg, residual_motion_map
from mofo.motion.boxes import boxes_for_clip, mass_box, temporal_median
from mofo.motion.camera import camera_residual, texture_confidence

ROOT = Path(__file__).resolve().parent.parent
LIST_YAML = ROOT / "config" / "list.yaml"  # by path: the tests may start in any folder

H, W = 96, 128


def affine_flow(a11=1.0, a12=0.0, a21=0.0, a22=1.0, tx=0.0, ty=0.0) -> np.ndarray:
    """Flow (H, W, 2) of x' = A x + t about the frame centre."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    xc, yc = x - W / 2, y - H / 2
    u = a11 * xc + a12 * yc + tx - xc
    v = a21 * xc + a22 * yc + ty - yc
    return np.stack([u, v], -1).astype(np.float32)


def rotation(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return affine_flow(c, -s, s, c)


@pytest.mark.parametrize("name, flow", [
    ("pan", affine_flow(tx=3.0, ty=-1.5)),
    ("zoom", affine_flow(1.04, 0, 0, 1.04)),
    ("rotation", rotation(2.0)),
    ("shake", affine_flow(1.01, 0.005, -0.004, 0.99, tx=-2.0, ty=2.5)),
])
def test_global_camera_motion_leaves_no_residual(name, flow):
    residual = camera_residual(flow[None])
    assert np.abs(flow).max() > 1.0, name  # the camera really moved
    assert np.abs(residual).max() < 1e-3, (name, float(np.abs(residual).max()))


def test_an_object_moving_over_a_panning_zooming_background_is_what_remains():
    flow = affine_flow(1.03, 0, 0, 1.03, tx=2.0, ty=1.0)
    flow[30:50, 70:100] += np.array([4.0, -3.0], np.float32)  # the object's own motion
    residual = np.linalg.norm(camera_residual(flow[None])[0], axis=-1)
    assert residual[30:50, 70:100].min() > 4.5 and np.delete(residual, np.s_[28:52], 0).max() < 1e-3
    cfg = load_config([LIST_YAML])
    maps = residual_motion_map(np.repeat(flow[None], 4, 0), 1, 2, 1.0)
    box = mass_box(maps[0], cfg["motion_boxes"])
    assert box is not None
    x1, y1, x2, y2 = box
    assert 66 <= x1 <= 72 and 98 <= x2 <= 104 and 26 <= y1 <= 32 and 48 <= y2 <= 54, box


def test_border_artefacts_make_no_box_on_a_still_scene():
    rng = np.random.default_rng(0)
    flow = np.zeros((6, H, W, 2), np.float32)
    edge = rng.normal(0, 3.0, (6, H, 4, 2)).astype(np.float32)  # flow noise on the edges only
    flow[:, :, :4] += edge
    flow[:, :, -4:] += edge[:, ::-1]
    cfg = load_config([LIST_YAML])
    maps = motion_map_from_cfg(flow, {**cfg["motion_map"], "texture_confidence": False})
    # The real-data border (12 px at 240 px: 5 px here) removes it; what leaks is below min_motion.
    assert float(maps.max()) < cfg["motion_boxes"]["min_motion"]
    boxes = boxes_for_clip(maps, 7, cfg["motion_boxes"])
    assert set(boxes["source"]) == {"static_clip"}


def test_texture_confidence_trusts_texture_not_flat_walls():
    rng = np.random.default_rng(1)
    frame = np.full((H, W, 3), 200, np.uint8)
    frame[:, W // 2:] = rng.integers(0, 255, (H, W // 2, 3), dtype=np.uint8)
    conf = texture_confidence(frame[None], H // 2, W // 2)
    assert conf.shape == (1, H // 2, W // 2)
    assert conf[0, :, :W // 4 - 6].max() < 0.05 and conf[0, :, W // 4 + 6:].mean() > 0.5


def test_mass_box_keeps_the_heaviest_group_not_a_faraway_mover():
    cfg = load_config([LIST_YAML])["motion_boxes"]
    m = np.zeros((H, W), np.float32)
    m[40:70, 20:50] = 1.0   # hand
    m[45:60, 52:64] = 0.8   # the object it holds, 2 px away: same group
    m[5:12, 110:118] = 0.9  # a small walker far away
    x1, y1, x2, y2 = mass_box(m, cfg)
    # the box reaches into the object (x 52-64; the 5 % quantiles trim its far edge), not the walker
    assert x1 <= 22 and 55 <= x2 < 100 and y1 <= 42 and y2 >= 68 and y1 > 12, (x1, y1, x2, y2)


def test_temporal_median_removes_a_one_frame_jump():
    boxes = [(10, 10, 50, 50)] * 3 + [(80, 0, 120, 30)] + [(12, 10, 52, 50)] * 3
    smooth = temporal_median(boxes, 5)
    assert smooth[3] in {(10, 10, 50, 50), (12, 10, 52, 50)} and len(smooth) == 7
    assert temporal_median(boxes, 1) == boxes


def test_a_clip_without_one_detected_frame_is_a_whole_clip_fallback():
    cfg = load_config()["motion_boxes"]
    maps = np.zeros((5, H, W), np.float32)
    maps[:, :, :] = 0.01  # moves, but everywhere alike: every frame's box is too large
    boxes = boxes_for_clip(maps, 6, {**cfg, "max_width": 0.3})
    assert set(boxes["source"]) == {"clip_fallback"} and len(boxes) == 6
    from mofo.motion.boxes import _count, _empty_report

    report = _empty_report()
    _count(report, boxes, no_flow=False)
    assert report["clips_fallback"] == 1 and report["clips_detected"] == 0
    assert report["clip_fallback"] == 6
