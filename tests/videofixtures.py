"""Helpers that write tiny REAL video files for tests (importable by every test module).

    from tests.videofixtures import write_video, make_frames

``make_frames`` draws a smooth, textured picture with a bright square moving right, so
frames compress well (PSNR checks are meaningful) and consecutive frames differ.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mofo.data.video import write_video as _write_video


def make_frames(
    n_frames: int = 12, height: int = 48, width: int = 64, seed: int = 0, speed: int = 2
) -> np.ndarray:
    """RGB uint8 (T, H, W, 3): smooth gradient background + a textured square moving right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    bg = np.stack(
        [
            0.5 + 0.3 * np.sin(xx / 9 + phase[0]),
            0.5 + 0.3 * np.cos(yy / 7 + phase[1]),
            0.5 + 0.2 * np.sin((xx + yy) / 11 + phase[2]),
        ],
        axis=-1,
    )
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    side = max(4, min(height, width) // 4)
    for t in range(n_frames):
        img = bg.copy()
        x0 = (2 + t * speed) % max(1, width - side)
        y0 = height // 3
        img[y0 : y0 + side, x0 : x0 + side] = [0.95, 0.9, 0.2]
        img[y0 + side // 3 : y0 + 2 * side // 3, x0 : x0 + side] = [0.9, 0.1, 0.1]
        frames[t] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return frames


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | None = None,
    *,
    n_frames: int = 12,
    height: int = 48,
    width: int = 64,
    fps: float = 12.0,
    seed: int = 0,
    codec: str | None = None,
) -> Path:
    """Write ``frames`` (or ``make_frames(...)``) to ``path``; codec from the suffix
    (.mp4 → H.264, .webm → VP9). Returns the path."""
    if frames is None:
        frames = make_frames(n_frames, height, width, seed)
    return _write_video(path, frames, fps=fps, codec=codec)


def write_random_bytes(path: str | os.PathLike, n_bytes: int = 4096, seed: int = 0) -> Path:
    """A 'video' that is random bytes (corrupt file)."""
    path = Path(path)
    path.write_bytes(
        np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    )
    return path


def truncate_copy(src: str | os.PathLike, dst: str | os.PathLike, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (a truncated download)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_no_frames(path: str | os.PathLike) -> Path:
    """An .mp4 with a header but no video frame at all."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
