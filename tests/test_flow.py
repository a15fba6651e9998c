"""Optical flow: each method recovers a known translation; shard files follow the contract."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mofo.config import load_config
from mofo.motion.flow import compute_flow, flow_shard, flow_size


def textured(seed: int = 0, h: int = 120, w: int = 150) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), 2.0)
    return cv2.normalize(t, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def translating_clip(n: int, dx: int, dy: int, h: int = 48, w: int = 64) -> np.ndarray:
    """The camera window moves by (dx, dy) per frame, so the content moves by (-dx, -dy)."""
    base = textured()
    frames = [base[20 + dy * i : 20 + dy * i + h, 20 + dx * i : 20 + dx * i + w] for i in range(n)]
    return np.stack([np.repeat(f[..., None], 3, axis=2) for f in frames])


@pytest.fixture
def flow_cfg() -> dict:
    return load_config()["optical_flow"]


@pytest.mark.parametrize("method", ["tvl1", "dis", "farneback"])
def test_recovers_a_translation_at_full_and_half_scale(flow_cfg, method):
    frames = translating_clip(3, dx=2, dy=-2)
    full = compute_flow(frames, dict(flow_cfg, method=method, scale=1.0))
    assert full.shape == (2, 48, 64, 2) and full.dtype == np.float32
    inner = full[:, 8:-8, 8:-8]
    assert np.median(inner[..., 0]) == pytest.approx(-2.0, abs=0.15)
    assert np.median(inner[..., 1]) == pytest.approx(2.0, abs=0.15)
    half = compute_flow(frames, dict(flow_cfg, method=method, scale=0.5))
    assert half.shape == (2, 24, 32, 2)
    # values are pixels of the reduced grid: half the displacement
    assert np.median(half[:, 4:-4, 4:-4, 0]) == pytest.approx(-1.0, abs=0.15)


def test_flow_is_clipped_to_the_bound(flow_cfg):
    frames = translating_clip(2, dx=4, dy=0)
    flow = compute_flow(frames, dict(flow_cfg, method="farneback", scale=1.0, bound=1.5))
    assert flow.min() >= -1.5 and flow.max() <= 1.5
    assert np.median(flow[..., 0]) == pytest.approx(-1.5)


@pytest.mark.parametrize("method", ["tvl1", "dis", "farneback"])
def test_tiny_frames_still_work(flow_cfg, method):
    frames = np.random.default_rng(0).integers(0, 255, (2, 20, 24, 3)).astype(np.uint8)
    assert compute_flow(frames, dict(flow_cfg, method=method, scale=0.25)).shape == (1, 16, 16, 2)


def test_one_frame_gives_zero_pairs_with_the_grid_size(flow_cfg):
    flow = compute_flow(translating_clip(1, 0, 0), dict(flow_cfg, scale=0.5))
    assert flow.shape == (0, 24, 32, 2)


def test_bad_input_and_method_are_named(flow_cfg):
    with pytest.raises(ValueError, match="uint8 RGB"):
        compute_flow(np.zeros((2, 10, 10), np.uint8), flow_cfg)
    with pytest.raises(ValueError, match="optical_flow.method"):
        compute_flow(translating_clip(2, 1, 0), dict(flow_cfg, method="raft"))


def test_flow_size():
    assert flow_size(96, 128, 0.5) == (48, 64)
    assert flow_size(40, 48, 0.25) == (16, 16)  # never below 16 px (DIS needs 12)


def test_flow_shard_writes_float16_per_clip(tmp_path, flow_cfg):
    from mofo.formats.framestore import FrameStoreWriter

    prefix = tmp_path / "frames" / "shard-0000"
    with FrameStoreWriter(prefix) as writer:
        for clip_id, n in [("a", 4), ("single", 1)]:
            writer.begin_clip(clip_id, src_height=96, src_width=128, fps=12.0)
            writer.add_frames(translating_clip(n, dx=2, dy=0))
            writer.end_clip()
    out = tmp_path / "flow" / "shard-0000.npz"
    cfg = dict(flow_cfg, method="dis", scale=0.5)
    assert flow_shard(prefix, out, cfg) == {"clips": 2, "failed": []}
    with np.load(out) as data:
        assert sorted(data.files) == ["a", "single"]
        assert data["a"].dtype == np.float16 and data["a"].shape == (3, 24, 32, 2)
        assert data["single"].shape == (0, 24, 32, 2)
        assert np.median(data["a"][..., 0].astype(np.float32)) == pytest.approx(-1.0, abs=0.2)
    assert not list(out.parent.glob("*.tmp"))
