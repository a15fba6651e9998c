"""The authors' motion boxes as published (``faithful`` mode; reference section 1).

``motion_map.method: faithful`` and ``motion_boxes.method: faithful`` select it (the schema
accepts one only with the other, and with TV-L1 flow at full size and bound 20: the flow they
ran). Every choice is pinned by ``AUTHORS`` below; the other keys of the two sections are
not read. For paper reruns; ``config/faithful.yaml`` sets it all.

Motion map (``faithful_motion_map``), per flow frame of a clip:

1. The flow (TV-L1, clipped to +-20 px by the flow stage) is quantised to uint8 as their flow
   tool writes it, ``q = round(255 (f + 20) / 40)`` saturated to 0..255 (round half to even,
   like ``cvRound``), and de-quantised back, ``f' = q 40 / 255 - 20``: an error of at most
   20/255 px per value (half a level). The map is computed in uint8 levels, ``f' x 255 / 40``
   = ``q - 127.5`` (see "units" below).
2. The x- and y-derivatives of u and of v with the raw 3x3 Prewitt kernels ([-1 0 1] on three
   rows: 6 a for a linear field u = a x), OpenCV's default border;
3. summed (not averaged) over ``window`` = 8 flow frames centred on the frame: frames
   i - 4 .. i + 3, cut at the clip ends (there the sum has fewer terms);
4. the gradient magnitude of u and that of v, ``sqrt(u_x^2 + u_y^2)`` and ``sqrt(v_x^2 +
   v_y^2)``, averaged (not Eq. 1's single magnitude over all four);
5. an 8-px border set to zero. No low pass here: the box step starts with one.

Box per frame (``faithful_box``): Gaussian sigma 1 -> values below 0.4 x max set to 0 ->
values below 1.5 x std (of the whole map, zeros included) set to 0 -> Gaussian sigma 30 ->
the integer map -> ``cv2.findContours`` (external contours) -> the two largest contours by
area, or only the largest when their centres (contour centroids) lie more than 0.4 x the
frame diagonal apart -> the bounding box of the filled contours (the union of their bounding
rectangles). ``mofo.motion.boxes.resolve_boxes`` then applies their fallbacks with their
clean-up limits (``AUTHORS_CLEANUP``): no contour -> centre box on the first frame, the
previous box later; a box wider than 0.7 w, taller than 0.7 h or under 1 % of the frame ->
the next frame's box. No ``min_motion`` static-clip test and no temporal median: they had
none (a static clip has an all-zero map, so no contour anywhere: a whole-clip fallback).

Assumptions (their script is not public in a form we can run; these are stated, not copied):

* Units. ``findContours`` takes integer images, so their blurred float map was cast to
  integers: we assume a numpy-style cast, truncation toward zero, so the foreground is where
  the blurred map is >= 1 *in their units*. Their maps were computed from the decoded uint8
  flow frames, so their units are uint8 flow levels (255 / 40 = 6.375 levels per px) with
  the raw Prewitt gain and the 8-frame sum. That absolute cut is why the map keeps those
  units here: a 60-px square moving 2 px per frame on a 240 x 320 grid gives a map peak of
  144 levels and, after the thresholds and the sigma-30 blur, a peak of 2.9, so the cut at 1
  sits at 35 % of the blob's peak; in px units (6.375 x smaller: 0.45) it would have no
  contour at all.
* Saturation. Values of the blurred map above 255 are clipped to 255 (a uint8 cast in numpy
  would wrap them, punching rings of zeros *inside* a blob; the external contour, and so the
  box, is the same either way).
* Contours are external (``RETR_EXTERNAL``): the box is of the *filled* contours, so holes
  never count. Centres are contour centroids (image moments).
* Sizes. Their 8 px and sigma 30 are for SSV2's 240-px-high flow; on a grid of another
  height they are scaled by height / 240 (sigma 1 is not). The absolute cut at 1 level is not
  scaled: run at 240-ish px (the flow at full size of frames decoded at ``decode.short_side``
  240-256) for a faithful rerun.
* Not reproduced: their flow was written as lossy mp4 video and decoded again, which adds
  codec noise on top of the quantisation; the uint8 quantisation is reproduced, the codec
  round-trip is not.
* Fallback reporting (``clip_fallback``, ``boxes.resolve_boxes``' handling of a bad box on the
  last frame) is this project's: it reports the same centre boxes their rule gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Recipe:
    """The numbers of the authors' SSV2 box-creator script (reference section 1)."""

    bound: float = 20.0            # flow clipped to +-bound px, quantised to 0..255
    window: int = 8                # flow frames summed around each frame (4 for Kinetics)
    border: int = 8                # px zeroed at the border, at reference_height
    reference_height: int = 240    # SSV2's frame height, for which border and blur_sigma hold
    smooth_sigma: float = 1.0      # first Gaussian
    rel_max: float = 0.4           # values below rel_max x max -> 0
    std_k: float = 1.5             # then values below std_k x std -> 0
    blur_sigma: float = 30.0       # Gaussian that merges the blobs (px at reference_height)
    two_contour_distance: float = 0.4  # second contour kept if centres closer than this x diagonal
    max_width: float = 0.7         # clean-up: box wider than this x w -> next frame's box
    max_height: float = 0.7        # clean-up: taller than this x h
    min_area: float = 0.01         # clean-up: smaller than this x h x w


AUTHORS = Recipe()
# ``resolve_boxes`` reads its clean-up limits from a boxes-config-like mapping.
AUTHORS_CLEANUP = {"max_width": AUTHORS.max_width, "max_height": AUTHORS.max_height,
                   "min_area": AUTHORS.min_area}
RAW_PREWITT_X = np.array([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]], dtype=np.float32)


def quantize_flow(flow: np.ndarray, bound: float = AUTHORS.bound) -> np.ndarray:
    """Flow in px -> uint8 levels as their flow tool writes it: ``round(255 (f + bound) /
    (2 bound))``, values beyond +-bound saturated to 0 / 255. Same shape."""
    f = np.asarray(flow, dtype=np.float64)
    return np.clip(np.rint(255.0 * (f + bound) / (2.0 * bound)), 0, 255).astype(np.uint8)


def dequantize_flow(q: np.ndarray, bound: float = AUTHORS.bound) -> np.ndarray:
    """uint8 levels -> flow in px: ``q 2 bound / 255 - bound`` (float32)."""
    return (np.asarray(q, dtype=np.float32) * (2.0 * bound / 255.0) - bound).astype(np.float32)


def flow_in_levels(flow: np.ndarray, bound: float = AUTHORS.bound) -> np.ndarray:
    """The quantised, de-quantised flow in the authors' units (uint8 levels, ``255 / (2
    bound)`` per px): ``q - 127.5``. (T, h, w, 2) float32."""
    return dequantize_flow(quantize_flow(flow, bound), bound) * np.float32(255.0 / (2.0 * bound))


def centred_window_sum(x: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum over ``window`` frames centred on each frame (frames i - window//2 .. i - window//2
    + window - 1, cut at the clip ends), along axis 0, and the number of frames in each sum
    (T,). window <= 1: (x, ones)."""
    t = x.shape[0]
    if window <= 1 or t <= 1:
        return x.astype(np.float32, copy=False), np.ones(t, dtype=np.int64)
    # Cumulative sum: O(T) whatever the window.
    csum = np.concatenate([np.zeros_like(x[:1], dtype=np.float64),
                           np.cumsum(x, axis=0, dtype=np.float64)])
    idx = np.arange(t)
    lo = np.clip(idx - window // 2, 0, t)
    hi = np.clip(idx - window // 2 + window, 0, t)
    return (csum[hi] - csum[lo]).astype(np.float32), hi - lo


def raw_prewitt_derivatives(flow: np.ndarray) -> np.ndarray:
    """(T, h, w, 2) -> float32 (T, h, w, 4) = (u_x, u_y, v_x, v_y) with the raw 3x3 Prewitt
    kernels (gain 6 on a linear field) and OpenCV's default border (reflect-101)."""
    t, h, w, _ = flow.shape
    out = np.empty((t, h, w, 4), dtype=np.float32)
    for i in range(t):
        for c in range(2):
            comp = np.ascontiguousarray(flow[i, :, :, c], dtype=np.float32)
            out[i, :, :, 2 * c] = cv2.filter2D(comp, -1, RAW_PREWITT_X)
            out[i, :, :, 2 * c + 1] = cv2.filter2D(comp, -1, RAW_PREWITT_X.T.copy())
    return out


def border_px(height: int, recipe: Recipe = AUTHORS) -> int:
    """The 8-px border scaled to a grid of ``height`` (at least 1 px)."""
    return max(1, round(recipe.border * height / recipe.reference_height))


def _zero_border(m: np.ndarray, b: int) -> np.ndarray:
    m[:, :b, :] = 0
    m[:, -b:, :] = 0
    m[:, :, :b] = 0
    m[:, :, -b:] = 0
    return m


def faithful_motion_map(flow: np.ndarray, recipe: Recipe = AUTHORS) -> np.ndarray:
    """The authors' motion map (module docstring, steps 1-5): flow (T-1, h, w, 2) in px ->
    float32 (T-1, h, w) in their units (uint8 flow levels x raw Prewitt x window sum)."""
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (T-1, h, w, 2), got shape {flow.shape}")
    if flow.shape[0] == 0:
        return np.zeros(flow.shape[:3], dtype=np.float32)
    d, _ = centred_window_sum(raw_prewitt_derivatives(flow_in_levels(flow, recipe.bound)),
                              recipe.window)
    m = 0.5 * (np.sqrt(d[..., 0] ** 2 + d[..., 1] ** 2) + np.sqrt(d[..., 2] ** 2 + d[..., 3] ** 2))
    return _zero_border(m.astype(np.float32), border_px(flow.shape[1], recipe))


def faithful_flow_magnitude_map(flow: np.ndarray, recipe: Recipe = AUTHORS) -> np.ndarray:
    """The raw-flow baseline in the same units: |window sum of the quantised flow| (uint8
    levels), the same border. (T-1, h, w, 2) -> float32 (T-1, h, w)."""
    if flow.shape[0] == 0:
        return np.zeros(flow.shape[:3], dtype=np.float32)
    f, _ = centred_window_sum(flow_in_levels(flow, recipe.bound), recipe.window)
    m = np.sqrt(f[..., 0] ** 2 + f[..., 1] ** 2).astype(np.float32)
    return _zero_border(m, border_px(flow.shape[1], recipe))


def integer_map(m: np.ndarray) -> np.ndarray:
    """The integer image findContours ran on: truncated toward zero, saturated to uint8."""
    return np.clip(np.floor(np.nan_to_num(m, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(
        np.uint8)


def _centre(contour: np.ndarray) -> tuple[float, float]:
    mom = cv2.moments(contour)
    if mom["m00"] > 0:
        return mom["m10"] / mom["m00"], mom["m01"] / mom["m00"]
    x, y, bw, bh = cv2.boundingRect(contour)
    return x + bw / 2.0, y + bh / 2.0


def two_contour_box(contours, height: int, width: int, max_distance: float) -> Box:
    """The authors' choice among contours: the largest by area, plus the second largest when
    their centres are at most ``max_distance`` x the frame diagonal apart; returns the
    bounding box of the filled pair (the union of their bounding rectangles), exclusive x2/y2.
    A 1-px-thin contour has polygon area 0, so the bounding-rectangle area breaks ties."""
    rects = [cv2.boundingRect(c) for c in contours]
    order = sorted(range(len(contours)),
                   key=lambda i: (cv2.contourArea(contours[i]), rects[i][2] * rects[i][3]),
                   reverse=True)
    keep = [order[0]]
    if len(order) > 1:
        c1, c2 = _centre(contours[order[0]]), _centre(contours[order[1]])
        if math.dist(c1, c2) <= max_distance * math.hypot(height, width):
            keep.append(order[1])
    return (int(min(rects[i][0] for i in keep)), int(min(rects[i][1] for i in keep)),
            int(max(rects[i][0] + rects[i][2] for i in keep)),
            int(max(rects[i][1] + rects[i][3] for i in keep)))


def faithful_box(m: np.ndarray, recipe: Recipe = AUTHORS) -> Box | None:
    """One frame's faithful map (h, w) -> its box in map pixels, or None without contour."""
    m = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    h, w = m.shape
    m = cv2.GaussianBlur(m, (0, 0), recipe.smooth_sigma)
    m[m < recipe.rel_max * m.max()] = 0
    m[m < recipe.std_k * m.std()] = 0
    m = cv2.GaussianBlur(m, (0, 0), recipe.blur_sigma * h / recipe.reference_height)
    contours, _ = cv2.findContours(integer_map(m), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    return two_contour_box(contours, h, w, recipe.two_contour_distance)
