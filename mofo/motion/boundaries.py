"""Motion maps from optical flow: motion boundaries (paper Eq. 1) plus a low-pass filter.

    m_i = sqrt(u_x^2 + u_y^2 + v_x^2 + v_y^2)            (Eq. 1)

A camera pan adds a constant to (u, v); its spatial derivatives are zero, so the map keeps
only the *edges* of independently moving things (Dalal et al. 2006).

Choices, and how they differ from the authors' script (docs: mofo-reference.md section 1;
``method: faithful`` follows their script instead, see ``mofo.motion.faithful``):

* Derivatives: 3x3 Prewitt kernels, like the authors, but divided by 6 so that a linear field
  u = a*x gives u_x = a exactly (the raw kernel gives 6a). Prewitt rather than plain central
  differences because it also averages across three rows/columns, which damps flow noise.
* Temporal window: the derivatives of ``temporal_window`` flow frames centred on the frame are
  combined *before* the magnitude, as in the authors' code. We take their MEAN instead of their
  sum: the relative box thresholds give the same boxes, the frames at the clip ends (where the
  window is cut short) are not weakened, and the map keeps the units of Eq. 1 (flow pixels per
  pixel per frame), so the static-clip threshold does not depend on the window.
* Magnitude: Eq. 1 (one magnitude over all four derivatives). The authors' code instead takes
  the gradient magnitude of u and of v separately and averages the two; for a rotation that
  gives |w| instead of Eq. 1's sqrt(2)|w|. The box rule uses relative thresholds, so the
  difference is in the shape of the map, not its scale.
* Border: ``border`` pixels are zeroed (flow is unreliable at the image border). The authors
  used 8 px on full-size 240-px-high flow; here the width scales with the map height against
  ``border_reference_height`` (like ``motion_boxes.blur_sigma``), and is at least 1 px since
  the 3x3 derivative there sees replicated pixels.
* Low pass: Gaussian with ``gaussian_sigma`` in pixels of the map (0 = none), after the border.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mofo.motion.faithful import (
    centred_window_sum,
    faithful_flow_magnitude_map,
    faithful_motion_map,
)
from mofo.motion.flow import save_npz_atomic

# Prewitt kernels normalised so that they return the derivative of a linear field exactly.
PREWITT_X = np.array([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]], dtype=np.float32) / 6.0
PREWITT_Y = PREWITT_X.T.copy()


def spatial_derivatives(flow: np.ndarray) -> np.ndarray:
    """(T, h, w, 2) flow -> float32 (T, h, w, 4) = (u_x, u_y, v_x, v_y) per pixel."""
    t, h, w, _ = flow.shape
    out = np.empty((t, h, w, 4), dtype=np.float32)
    for i in range(t):
        for c in range(2):
            comp = np.ascontiguousarray(flow[i, :, :, c], dtype=np.float32)
            out[i, :, :, 2 * c] = cv2.filter2D(comp, -1, PREWITT_X, borderType=cv2.BORDER_REPLICATE)
            out[i, :, :, 2 * c + 1] = cv2.filter2D(
                comp, -1, PREWITT_Y, borderType=cv2.BORDER_REPLICATE
            )
    return out


def temporal_window_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean over ``window`` frames centred on each frame (frames i - window//2 ...
    i - window//2 + window - 1, cut at the clip ends), along axis 0. window 1 = identity."""
    total, count = centred_window_sum(x, window)
    return (total / count.reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float32)


def scaled_border(border: int, height: int, reference_height: float) -> int:
    """Border width in map pixels: ``border`` at ``reference_height``, scaled to ``height``
    (reference 0 = use as is); at least 1 px when ``border`` > 0."""
    if border <= 0:
        return 0
    if reference_height and reference_height > 0:
        return max(1, round(border * height / reference_height))
    return int(border)


def _finish_map(m: np.ndarray, border: int, gaussian_sigma: float) -> np.ndarray:
    """Zero the border and low-pass each frame of (T, h, w) in place; returns it."""
    if border > 0:
        m[:, :border, :] = 0
        m[:, -border:, :] = 0
        m[:, :, :border] = 0
        m[:, :, -border:] = 0
    if gaussian_sigma > 0:
        for i in range(m.shape[0]):
            m[i] = cv2.GaussianBlur(m[i], (0, 0), gaussian_sigma, borderType=cv2.BORDER_REPLICATE)
    return m


def _check_flow(flow: np.ndarray) -> None:
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (T-1, h, w, 2), got shape {flow.shape}")


def motion_boundaries(
    flow: np.ndarray, temporal_window: int = 1, border: int = 0, gaussian_sigma: float = 0.0
) -> np.ndarray:
    """Motion map of Eq. 1: flow (T-1, h, w, 2) -> float32 (T-1, h, w).

    ``border`` is in map pixels here (already scaled); see the module docstring for the
    Prewitt/6 derivatives, the centred temporal mean of the derivatives and the border.
    A zero-length flow gives a zero-length map.
    """
    _check_flow(flow)
    if flow.shape[0] == 0:
        return np.zeros(flow.shape[:3], dtype=np.float32)
    d = temporal_window_mean(spatial_derivatives(flow), int(temporal_window))
    m = np.sqrt(np.sum(d * d, axis=-1)).astype(np.float32)
    return _finish_map(m, int(border), float(gaussian_sigma))


def flow_magnitude_map(
    flow: np.ndarray, temporal_window: int = 1, border: int = 0, gaussian_sigma: float = 0.0
) -> np.ndarray:
    """The raw-flow baseline: |mean flow over the same window|, same border and low pass as
    ``motion_boundaries`` — what the boxes would be without motion boundaries (camera motion
    then lights up the whole frame). flow (T-1, h, w, 2) -> float32 (T-1, h, w)."""
    _check_flow(flow)
    if flow.shape[0] == 0:
        return np.zeros(flow.shape[:3], dtype=np.float32)
    f = temporal_window_mean(flow.astype(np.float32), int(temporal_window))
    m = np.sqrt(np.sum(f * f, axis=-1)).astype(np.float32)
    return _finish_map(m, int(border), float(gaussian_sigma))


def residual_motion_map(
    flow: np.ndarray, temporal_window: int = 1, border: int = 0, gaussian_sigma: float = 0.0,
    confidence: np.ndarray | None = None,
) -> np.ndarray:
    """The ``residual`` motion map for real footage: |flow - the frame pair's global affine
    camera motion| (``mofo.motion.camera.camera_residual``), weighted by ``confidence``
    ((T-1, h, w) in [0, 1], e.g. ``texture_confidence``; None = 1), then the same temporal
    mean, border and low pass as the other maps. flow (T-1, h, w, 2) -> float32 (T-1, h, w).

    Unlike Eq. 1 it keeps the whole moving region (a hand's flat inside moves too), and a zoom,
    rotation or shake of the camera cancels, not only a pan."""
    from mofo.motion.camera import camera_residual

    _check_flow(flow)
    if flow.shape[0] == 0:
        return np.zeros(flow.shape[:3], dtype=np.float32)
    residual = camera_residual(flow)
    m = np.sqrt(np.sum(residual * residual, axis=-1)).astype(np.float32)
    if confidence is not None:
        m *= confidence[: len(m)]
    m = temporal_window_mean(m, int(temporal_window))
    return _finish_map(m, int(border), float(gaussian_sigma))


def motion_map_from_cfg(
    flow: np.ndarray, motion_map_cfg: dict, raw_flow: bool = False,
    frames: np.ndarray | None = None,
) -> np.ndarray:
    """The motion map that ``motion_map.method`` names (``boundaries``: Eq. 1;
    ``residual``: camera-cancelled flow magnitude; ``faithful``: the authors' map,
    ``mofo.motion.faithful``, which reads no other key of the section), or the raw-flow
    baseline when ``raw_flow`` (``flow_magnitude_map``; for ``faithful`` the same in its
    units), with the section's settings; the border is scaled to the flow's height.
    ``frames`` (T, H, W, 3) uint8: the clip's frames, for ``texture_confidence`` (required
    when the section turns it on)."""
    if motion_map_cfg["method"] == "faithful":
        return faithful_flow_magnitude_map(flow) if raw_flow else faithful_motion_map(flow)
    border = scaled_border(
        int(motion_map_cfg["border"]),
        flow.shape[1],
        float(motion_map_cfg["border_reference_height"]),
    )
    window, sigma = int(motion_map_cfg["temporal_window"]), float(motion_map_cfg["gaussian_sigma"])
    if raw_flow:
        return flow_magnitude_map(flow, window, border, sigma)
    if motion_map_cfg["method"] == "boundaries":
        return motion_boundaries(flow, window, border, sigma)
    confidence = None
    if motion_map_cfg["texture_confidence"]:
        if frames is None:
            raise ValueError("motion_map.texture_confidence needs the clip's frames")
        from mofo.motion.camera import texture_confidence

        confidence = texture_confidence(frames[: flow.shape[0]], flow.shape[1], flow.shape[2])
    return residual_motion_map(flow, window, border, sigma, confidence)


def motion_map_shard(
    flow_path: str | Path,
    out_path: str | Path,
    motion_map_cfg: dict,
    raw_flow_out: str | Path | None = None,
    frames_prefix: str | Path | None = None,
) -> dict:
    """Read ``flow/shard-XXXX.npz``, write ``motion_map/shard-XXXX.npz`` (float16 (T-1, h, w)
    per clip). With ``raw_flow_out``, also write the raw-flow-magnitude maps there (same
    layout; the box-quality baseline), so the flow file can be deleted afterwards.
    ``frames_prefix``: the shard's frame store, read when ``motion_map.texture_confidence``.
    A clip whose flow array is malformed is reported on stderr and left out.
    Returns ``{"clips": n, "failed": [clip ids]}``.
    """
    maps: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    failed: list[str] = []
    store = None
    if motion_map_cfg["method"] == "residual" and motion_map_cfg["texture_confidence"]:
        from mofo.formats.framestore import FrameStore

        store = FrameStore(frames_prefix)
    with np.load(flow_path) as data:
        for clip_id in tqdm(
            list(data.files), desc=f"motion map {Path(out_path).stem}", file=sys.stderr
        ):
            try:
                flow = data[clip_id].astype(np.float32)
                frames = store.read(clip_id) if store is not None else None
                maps[clip_id] = motion_map_from_cfg(flow, motion_map_cfg,
                                                    frames=frames).astype(np.float16)
                if raw_flow_out is not None:
                    raw[clip_id] = motion_map_from_cfg(flow, motion_map_cfg, raw_flow=True).astype(
                        np.float16
                    )
            except Exception as exc:  # one bad clip must not lose the shard
                print(f"[motion_map] {flow_path}: clip {clip_id}: {exc}", file=sys.stderr)
                failed.append(clip_id)
                maps.pop(clip_id, None)
    save_npz_atomic(out_path, maps)
    if raw_flow_out is not None:
        save_npz_atomic(raw_flow_out, {k: raw[k] for k in maps})
    return {"clips": len(maps), "failed": failed}
