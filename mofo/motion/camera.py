"""What the camera did, taken out of the flow; and where the flow can be trusted.

Real footage breaks the two assumptions motion boundaries (paper Eq. 1) rest on: a camera
that only translates, and flow that is right everywhere. A zoom, a rotation or a hand-held
shake has spatial derivatives of its own, so Eq. 1 lights up the whole textured background;
textureless walls, glare and the frame border give strong spurious flow. Two remedies, both
used by the ``residual`` motion map (``mofo.motion.boundaries``):

* :func:`camera_residual` fits one global affine motion per frame pair to the flow, robustly
  (RANSAC on a sparse grid of flow vectors, as improved dense trajectories cancel camera
  motion with a robustly fitted homography), and subtracts it: a pan, zoom, rotation or shake
  leaves ~zero residual, an object moving over it keeps its own motion.
* :func:`texture_confidence` weights each pixel by how well its flow is constrained: the
  smaller eigenvalue of the image's structure tensor (corners and texture: high; flat walls
  and sky, where any flow fits: low), normalised per clip.
"""

from __future__ import annotations

import cv2
import numpy as np

# RANSAC inlier distance in flow-grid pixels, iterations, and the grid step of the sampled
# flow vectors (a 128 x 170 flow grid gives ~1,400 vectors at step 4).
RANSAC_THRESHOLD = 0.5
RANSAC_ITERS = 500
GRID_STEP = 4


def camera_model_flow(flow: np.ndarray, step: int = GRID_STEP) -> np.ndarray:
    """The flow of the best global affine motion of one frame pair: (h, w, 2) -> (h, w, 2).

    Fitted with RANSAC to the flow sampled every ``step`` pixels; without a fit (too few or
    degenerate vectors) the median flow, i.e. a pure translation."""
    h, w, _ = flow.shape
    ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
    src = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32)
    dst = src + flow[ys, xs].reshape(-1, 2).astype(np.float32)
    model = None
    if len(src) >= 3:
        model, _ = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
                                        ransacReprojThreshold=RANSAC_THRESHOLD,
                                        maxIters=RANSAC_ITERS, confidence=0.99, refineIters=5)
    if model is None:
        return np.broadcast_to(np.median(flow.reshape(-1, 2), axis=0), flow.shape).astype(np.float32)
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    out = np.empty((h, w, 2), dtype=np.float32)
    out[..., 0] = model[0, 0] * gx + model[0, 1] * gy + model[0, 2] - gx
    out[..., 1] = model[1, 0] * gx + model[1, 1] * gy + model[1, 2] - gy
    return out


def camera_residual(flow: np.ndarray) -> np.ndarray:
    """Flow minus each frame pair's global affine camera motion: (T, h, w, 2) float32."""
    flow = np.asarray(flow, dtype=np.float32)
    return np.stack([f - camera_model_flow(f) for f in flow]) if len(flow) else flow.copy()


def texture_confidence(frames_rgb: np.ndarray, height: int, width: int,
                       block: int = 5, sigma: float = 2.0) -> np.ndarray:
    """Per-pixel trust in the flow, in [0, 1], on the (height, width) flow grid.

    The smaller structure-tensor eigenvalue of each frame (``cv2.cornerMinEigenVal``, block
    ``block``), divided by its clip-wide 90th percentile and clipped to 1, then smoothed
    (``sigma`` px) so that an object's flat inside keeps the trust of its textured edges.
    frames_rgb (T, H, W, 3) uint8 -> float32 (T, height, width)."""
    out = np.empty((len(frames_rgb), height, width), dtype=np.float32)
    for i, frame in enumerate(frames_rgb):
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
        out[i] = cv2.cornerMinEigenVal(gray.astype(np.float32) / 255.0, block)
    ref = float(np.percentile(out, 90)) if out.size else 0.0
    if ref <= 0:
        return np.ones_like(out)
    np.clip(out / ref, 0.0, 1.0, out=out)
    for i in range(len(out)):
        out[i] = cv2.GaussianBlur(out[i], (0, 0), sigma)
    return out
