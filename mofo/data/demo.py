"""The built-in "motion shapes" dataset: small synthetic clips whose class is a motion.

Each clip shows ONE textured foreground object (rectangle, ellipse or scalene triangle, all
elongated and carrying an off-centre dark marker, so no motion is ambiguous) whose motion
alone defines the class:

* ``left`` / ``right`` / ``up`` / ``down``: translation (relative to the scene),
* ``grow`` / ``shrink``: scaling about a fixed centre,
* ``clockwise`` / ``anticlockwise``: rotation as seen on screen (image y axis points down).

``n_distractors`` static look-alike objects (same shape family and palette) make appearance
useless for finding the object. The background (``background``) is a smooth colour gradient
(the default: masked reconstruction can learn it) or a texture of noise, stripes and a grid
(optical flow has texture everywhere; reconstruction cannot beat the floor at 32 px). On ``camera_motion_fraction`` of the clips of each
split a global camera motion moves the whole picture (``pan``: constant velocity, or
``shake``: random jitter), so raw flow magnitude is misleading but motion boundaries are not.

Outputs of ``generate(demo_cfg)`` under ``root``:

* ``videos/<clip_id>.mp4`` (H.264, yuv420p, lossless: see ``CRF``),
* ``clips.csv``: ``clip_id, video_path, label, class_name, split, camera_motion, fps`` where
  ``video_path`` is relative to ``root`` (``videos/<clip_id>.mp4``; the manifest adapter joins
  it with ``root``) and ``camera_motion`` is ``none``, ``pan`` or ``shake``,
* ``gt_boxes.csv``: ``clip_id, frame, x1, y1, x2, y2``: the moving object's box in each frame
  after camera motion, in pixels, x2/y2 exclusive, clipped to the frame.

Everything is decided by ``seed`` (one numpy Generator per clip seeded with
``(seed, split, index)``) and the videos are lossless, so the same config gives identical
CSVs and identical decoded frames (the video bytes may differ: see ``CRF``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from mofo.data.video import write_video
from mofo.formats.boxfile import FRAME_BOX_COLUMNS as BOX_COLUMNS  # one home for the columns

SPLITS = ("train", "validation")
#: x264's constant-quality setting for the demo videos: 0 = lossless. At crf 18, single-threaded
#: x264 gave different bytes -- and different decoded frames -- for the same grainy frames in
#: ~1 of 40 to 1 of 1000 encodes (more often on a loaded machine), so the demo's results were
#: not reproducible to the last digit. Lossless decodes to exactly the rendered yuv420p frames
#: whatever the encoder decides; it costs ~75 kB per 24-frame 96x128 clip (40 MB for the demo's
#: 540 clips) instead of ~15 kB.
CRF = 0
SHAPES = ("rectangle", "ellipse", "triangle")
# Saturated object colours (RGB 0..1); the background is kept duller so objects stand out.
PALETTE = np.array(
    [
        [0.90, 0.20, 0.15],
        [0.15, 0.55, 0.95],
        [0.95, 0.80, 0.10],
        [0.20, 0.80, 0.30],
        [0.85, 0.30, 0.85],
        [0.95, 0.55, 0.10],
        [0.10, 0.85, 0.85],
        [0.95, 0.95, 0.95],
    ]
)
SPRITE = 64  # sprite canvas side; the object's long axis is REF_LEN px in it
REF_LEN = 48.0
EDGE_MARGIN = 2.0  # keep the object at least this many pixels inside the frame

CLIP_COLUMNS = ["clip_id", "video_path", "label", "class_name", "split", "camera_motion", "fps"]


def clip_id(split: str, index: int) -> str:
    return f"demo_{split}_{index:04d}"


def clips_per_split(demo_cfg: dict) -> dict[str, int]:
    n_classes = len(demo_cfg["classes"])
    return {
        "train": n_classes * int(demo_cfg["train_clips_per_class"]),
        "validation": n_classes * int(demo_cfg["val_clips_per_class"]),
    }


def count_clips(demo_cfg: dict) -> int:
    """Number of clips ``generate`` writes (from the config alone)."""
    return sum(clips_per_split(demo_cfg).values())


def camera_kind(demo_cfg: dict, split: str, index: int) -> str:
    """``none``/``pan``/``shake`` for a clip.

    Exactly round(fraction * n) clips of each split get a moving camera, half pans, half shakes.
    """
    n = clips_per_split(demo_cfg)[split]
    rng = np.random.default_rng([int(demo_cfg["seed"]), SPLITS.index(split), 1_000_003])
    order = rng.permutation(n)
    n_moving = int(round(float(demo_cfg["camera_motion_fraction"]) * n))
    rank = int(order[index])
    if rank >= n_moving:
        return "none"
    return "pan" if rank % 2 == 0 else "shake"


# --------------------------------------------------------------------------------------------
# Pieces of a clip
# --------------------------------------------------------------------------------------------
def _shape_vertices(shape: str, aspect: float) -> np.ndarray:
    """Polygon (N, 2) of the shape centred on 0 with long axis REF_LEN along x."""
    half_l, half_w = REF_LEN / 2, REF_LEN * aspect / 2
    if shape == "rectangle":
        return np.array(
            [[-half_l, -half_w], [half_l, -half_w], [half_l, half_w], [-half_l, half_w]]
        )
    if shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([half_l * np.cos(t), half_w * np.sin(t)], axis=1)
    if shape == "triangle":  # scalene: no symmetry at all
        tri = np.array([[-half_l, -half_w], [half_l, -half_w / 3], [-half_l / 3, half_w]])
        return tri - tri.mean(axis=0)
    raise ValueError(f"unknown shape {shape!r}")


def _make_sprite(
    rng: np.random.Generator, shape: str, colour: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured object on a SPRITE x SPRITE canvas: (rgb float32, alpha float32, vertices).

    Texture = stripes in the object's own frame plus a dark marker disc off-centre, so the
    pattern moves rigidly with the object (consistent flow) and rotation is unambiguous.
    """
    aspect = rng.uniform(0.45, 0.7)
    verts = _shape_vertices(shape, aspect)
    centre = SPRITE / 2 - 0.5  # pixel-centre coordinates of the canvas middle
    mask = np.zeros((SPRITE, SPRITE), np.uint8)
    pts = np.round((verts + centre) * 16).astype(np.int32)  # 4 fractional bits for cv2
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=4)
    yy, xx = np.mgrid[0:SPRITE, 0:SPRITE].astype(np.float32)
    phi = rng.uniform(0, np.pi)
    period = rng.uniform(5, 8)
    stripes = np.sin(2 * np.pi * ((xx * np.cos(phi) + yy * np.sin(phi)) / period))
    shade = 0.75 + 0.25 * stripes
    marker = verts.mean(axis=0) + 0.45 * (verts[0] - verts.mean(axis=0)) + centre
    disc = np.hypot(xx - marker[0], yy - marker[1]) < 4.5
    shade[disc] = 0.15
    rgb = np.clip(colour[None, None, :] * shade[..., None], 0, 1).astype(np.float32)
    return rgb, mask.astype(np.float32) / 255.0, verts


def _background(
    rng: np.random.Generator, height: int, width: int, kind: str, grain: float
) -> np.ndarray:
    """Dull background (float32 RGB 0..1) of ``kind`` (``dataset.demo.background``).

    ``gradient``: one linear colour ramp over the whole scene (random direction; per channel a
    slope of 0.3-0.6 over the scene's long side, random sign) plus a fine grey grain of standard
    deviation ``grain`` (pixel noise blurred with sigma 0.75 px). Every patch of the ramp is the
    same ramp, so an autoencoder that sees a few patches can predict the masked ones; the grain
    gives optical flow something to hold on to (on a bare ramp DIS smears the object's flow into
    the background and the boxes grow); the 32-px model input averages only part of it away,
    and what remains the reconstruction cannot predict (what the grain costs: docs/BENCHMARKS.md
    "How good are the boxes? (demo)").
    ``texture``: smoothed noise + stripes + a checker grid, so optical flow has texture
    everywhere -- but at the demo's 32-px model input its patches are unpredictable noise and
    masked reconstruction stays at the floor (``grain`` is not used).
    """
    if kind == "gradient":
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        phi = rng.uniform(0, 2 * np.pi)
        along = (xx * np.cos(phi) + yy * np.sin(phi)) / max(height, width)
        slope = rng.uniform(0.3, 0.6, size=3) * rng.choice([-1.0, 1.0], size=3)
        base = rng.uniform(0.3, 0.55, size=3) - slope * along.mean()
        fine = cv2.GaussianBlur(rng.normal(size=(height, width)).astype(np.float32), (0, 0), 0.75)
        fine *= grain / max(float(fine.std()), 1e-6)
        bg = base + along[..., None] * slope + fine[..., None]
        return np.clip(bg, 0, 1).astype(np.float32)
    if kind != "texture":
        raise ValueError(f"dataset.demo.background must be gradient or texture, got {kind!r}")
    base = rng.uniform(0.3, 0.55, size=3)
    coarse = rng.normal(size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    low = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.normal(size=(height, width)).astype(np.float32), (0, 0), 1.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phi = rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / rng.uniform(9, 15))
    cell = int(rng.integers(10, 16))
    grid = (((xx.astype(int) // cell) + (yy.astype(int) // cell)) % 2).astype(np.float32) - 0.5
    bg = (
        base
        + 0.10 * low
        + 0.06 * stripes[..., None]
        + 0.06 * grid[..., None]
        + 0.08 * fine[..., None]
    )
    return np.clip(bg, 0, 1).astype(np.float32)


def _camera_path(rng: np.random.Generator, kind: str, n_frames: int) -> np.ndarray:
    """Camera offset (T, 2) in pixels, (x, y); the picture moves by minus this offset."""
    t = np.arange(n_frames, dtype=np.float64)[:, None]
    if kind == "pan":
        angle = rng.uniform(0, 2 * np.pi)
        # Slower than the object (1.5-2.5 px/frame) so that the object's on-screen motion still
        # shows its class; the flow-based boxes must still discount the pan.
        speed = rng.uniform(0.6, 0.9)
        return t * speed * np.array([[np.cos(angle), np.sin(angle)]])
    if kind == "shake":
        return rng.uniform(-2.5, 2.5, size=(n_frames, 2))
    return np.zeros((n_frames, 2))


def _affine(centre: np.ndarray, scale: float, angle: float) -> np.ndarray:
    """2x3 matrix: local (object-centred) coords → picture coords.

    Positive ``angle`` turns clockwise on screen because the image y axis points down.
    """
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, centre[0]], [scale * s, scale * c, centre[1]]])


def _transform(verts: np.ndarray, m: np.ndarray) -> np.ndarray:
    return verts @ m[:, :2].T + m[:, 2]


def _motion(
    rng: np.random.Generator, cls: str, n_frames: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame (scene-relative centre offset (T, 2), scale (T,), angle (T,)) of the object.

    Sizes are long-axis lengths in pixels; speeds ~1.5-2.5 px/frame at 96 px height (scaled
    with the frame height), so every motion is clearly visible. The object spans about a third
    of the frame height so that it still covers a few model patches after the demo's downscale
    to a 32 px input (smaller objects drown in the background texture there).
    """
    t = np.arange(n_frames, dtype=np.float64)
    unit = height / 96.0
    angle0 = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(30, 38) * unit
    offset = np.zeros((n_frames, 2))
    scale = np.full(n_frames, length / REF_LEN)
    angle = np.full(n_frames, angle0)
    directions = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    if cls in directions:
        offset = (
            t[:, None] * rng.uniform(1.5, 2.5) * unit * np.array(directions[cls], float)[None, :]
        )
    elif cls in ("grow", "shrink"):
        small, big = rng.uniform(16, 20) * unit, min(rng.uniform(54, 62) * unit, 0.8 * height)
        lengths = np.linspace(small, big, n_frames)
        scale = (lengths if cls == "grow" else lengths[::-1]) / REF_LEN
    elif cls in ("clockwise", "anticlockwise"):
        length = rng.uniform(34, 42) * unit
        scale = np.full(n_frames, length / REF_LEN)
        omega = np.deg2rad(rng.uniform(5, 8))
        angle = angle0 + (1 if cls == "clockwise" else -1) * omega * t
    else:
        raise ValueError(f"unknown demo class {cls!r}")
    return offset, scale, angle


def _place(
    path_rel: np.ndarray, radius: np.ndarray, height: int, width: int, rng: np.random.Generator
) -> np.ndarray | None:
    """Start point p0 so that p0 + path_rel[t] stays ``radius[t]`` inside the frame, or None."""
    p0 = np.zeros(2)
    for axis, size in ((0, width), (1, height)):
        lo = np.max(radius + EDGE_MARGIN - path_rel[:, axis])
        hi = np.min(size - radius - EDGE_MARGIN - path_rel[:, axis])
        if lo > hi:
            return None
        p0[axis] = rng.uniform(lo, hi)
    return p0


def _screen_box(
    verts: np.ndarray, m: np.ndarray, height: int, width: int
) -> tuple[int, int, int, int]:
    """Pixel box (x1, y1, x2, y2), x2/y2 exclusive, of a polygon in pixel-centre coordinates."""
    pts = _transform(verts, m)
    x1 = max(0, math.ceil(pts[:, 0].min() - 0.5))
    y1 = max(0, math.ceil(pts[:, 1].min() - 0.5))
    x2 = min(width, math.floor(pts[:, 0].max() + 0.5) + 1)
    y2 = min(height, math.floor(pts[:, 1].max() + 0.5) + 1)
    return x1, y1, x2, y2


def _paste(
    canvas: np.ndarray,
    sprite: tuple[np.ndarray, np.ndarray, np.ndarray],
    m_local: np.ndarray,
    out_mask: np.ndarray | None = None,
) -> None:
    """Alpha-blend a sprite onto ``canvas`` with the local→canvas affine ``m_local``."""
    rgb, alpha, _ = sprite
    centre = SPRITE / 2 - 0.5
    # sprite pixel (u, v) has local coords (u - centre, v - centre)
    m = m_local.copy()
    m[:, 2] = m_local[:, 2] - m_local[:, :2] @ np.array([centre, centre])
    h, w = canvas.shape[:2]
    a = cv2.warpAffine(alpha, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    c = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    canvas *= 1 - a[..., None]
    canvas += c * a[..., None]
    if out_mask is not None:
        np.maximum(out_mask, a, out=out_mask)


# --------------------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------------------
def render_clip(
    demo_cfg: dict, split: str, index: int, with_mask: bool = False
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render clip ``index`` of ``split``: RGB uint8 frames (T, H, W, 3), boxes (T, 4) int
    ``x1, y1, x2, y2`` (exclusive) and a dict with ``clip_id, label, class_name,
    camera_motion`` (plus ``mask`` (T, H, W) float32 alpha of the moving object when
    ``with_mask``)."""
    classes = list(demo_cfg["classes"])
    label = index % len(classes)
    cls = classes[label]
    n_frames, height, width = (
        int(demo_cfg["num_frames"]),
        int(demo_cfg["height"]),
        int(demo_cfg["width"]),
    )
    rng = np.random.default_rng([int(demo_cfg["seed"]), SPLITS.index(split), index])
    kind = camera_kind(demo_cfg, split, index)
    camera = _camera_path(rng, kind, n_frames)

    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = PALETTE[rng.integers(len(PALETTE))]
    mover = _make_sprite(rng, shape, colour)
    offset, scale, angle = _motion(rng, cls, n_frames, height)
    radius = scale * np.linalg.norm(mover[2], axis=1).max()
    # Screen path of the centre = p0 + scene offset - camera; shrink the motion until it fits.
    for _ in range(20):
        p0 = _place(offset - camera, radius, height, width, rng)
        if p0 is not None:
            break
        offset, camera = offset * 0.85, camera * 0.85
    else:
        raise ValueError(
            f"demo clip {clip_id(split, index)}: object does not fit a {height}x{width} frame"
        )
    centres = p0 + offset - camera  # screen coordinates

    # Static look-alikes, placed (at frame 0) away from the mover's path where possible.
    path_box = np.array(
        [
            (centres[:, 0] - radius).min(),
            (centres[:, 1] - radius).min(),
            (centres[:, 0] + radius).max(),
            (centres[:, 1] + radius).max(),
        ]
    )
    distractors = []
    for _ in range(int(demo_cfg["n_distractors"])):
        d_shape = shape if rng.random() < 0.5 else SHAPES[rng.integers(len(SHAPES))]
        d_colour = (
            np.clip(colour + rng.normal(0, 0.08, 3), 0, 1)
            if rng.random() < 0.5
            else PALETTE[rng.integers(len(PALETTE))]
        )
        sprite = _make_sprite(rng, d_shape, d_colour)
        d_scale = rng.uniform(24, 38) * height / 96.0 / REF_LEN
        d_radius = d_scale * np.linalg.norm(sprite[2], axis=1).max()
        d_angle = rng.uniform(0, 2 * np.pi)
        for _try in range(30):
            pos = _place(np.zeros((1, 2)), np.array([d_radius]), height, width, rng)
            if pos is None:
                break
            clear = (
                pos[0] + d_radius < path_box[0]
                or pos[0] - d_radius > path_box[2]
                or pos[1] + d_radius < path_box[1]
                or pos[1] - d_radius > path_box[3]
            )
            if clear:
                break
        if pos is not None:
            distractors.append((sprite, pos + camera[0], d_scale, d_angle))  # scene coords

    # The scene canvas is larger than the frame by the camera's largest excursion.
    margin = int(math.ceil(np.abs(camera).max())) + 2
    scene_h, scene_w = height + 2 * margin, width + 2 * margin
    background = _background(
        rng, scene_h, scene_w, str(demo_cfg["background"]), float(demo_cfg["grain"])
    )
    static = background.copy()
    for sprite, pos, d_scale, d_angle in distractors:
        _paste(static, sprite, _affine(pos + margin, d_scale, d_angle))

    frames = np.empty((n_frames, height, width, 3), np.uint8)
    boxes = np.empty((n_frames, 4), np.int64)
    masks = np.zeros((n_frames, height, width), np.float32) if with_mask else None
    for t in range(n_frames):
        scene = static.copy()
        scene_centre = centres[t] + camera[t] + margin
        m_scene = _affine(scene_centre, scale[t], angle[t])
        scene_mask = np.zeros((scene_h, scene_w), np.float32) if with_mask else None
        _paste(scene, mover, m_scene, scene_mask)
        # Crop the frame out of the scene with a sub-pixel shift (the camera).
        crop = np.array(
            [[1.0, 0.0, -(margin + camera[t, 0])], [0.0, 1.0, -(margin + camera[t, 1])]]
        )
        frame = cv2.warpAffine(
            scene, crop, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        frames[t] = np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8)
        boxes[t] = _screen_box(mover[2], _affine(centres[t], scale[t], angle[t]), height, width)
        if with_mask:
            masks[t] = cv2.warpAffine(scene_mask, crop, (width, height), flags=cv2.INTER_LINEAR)
    info = dict(clip_id=clip_id(split, index), label=label, class_name=cls, camera_motion=kind)
    if with_mask:
        info["mask"] = masks
    return frames, boxes, info


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------
def generate(demo_cfg: dict) -> pd.DataFrame:
    """Write the demo videos, ``clips.csv`` and ``gt_boxes.csv`` under ``demo_cfg["root"]``.

    Returns the clips table (``CLIP_COLUMNS``). Files are written to temporary names and
    renamed, the CSVs last, so an interrupted run never leaves a complete-looking dataset.
    """
    root = Path(demo_cfg["root"])
    if int(demo_cfg["height"]) % 2 or int(demo_cfg["width"]) % 2:
        raise ValueError(
            f"dataset.demo: height and width must be even for yuv420p, got "
            f"{demo_cfg['height']}x{demo_cfg['width']}"
        )
    (root / "videos").mkdir(parents=True, exist_ok=True)
    fps = float(demo_cfg["fps"])
    clip_rows, box_rows = [], []
    jobs = [(split, i) for split, n in clips_per_split(demo_cfg).items() for i in range(n)]
    for split, index in tqdm(jobs, desc="demo clips", unit="clip", leave=False):
        frames, boxes, info = render_clip(demo_cfg, split, index)
        rel = Path("videos") / f"{info['clip_id']}.mp4"
        tmp = root / "videos" / f".{info['clip_id']}.tmp.mp4"
        write_video(tmp, frames, fps=fps, codec="libx264", crf=CRF)
        os.replace(tmp, root / rel)
        clip_rows.append(
            (
                info["clip_id"],
                rel.as_posix(),
                info["label"],
                info["class_name"],
                split,
                info["camera_motion"],
                fps,
            )
        )
        box_rows.extend((info["clip_id"], t, *map(int, b)) for t, b in enumerate(boxes))
    clips = pd.DataFrame(clip_rows, columns=CLIP_COLUMNS)
    gt = pd.DataFrame(box_rows, columns=BOX_COLUMNS)
    _write_csv(gt, root / "gt_boxes.csv")
    _write_csv(clips, root / "clips.csv")
    return clips


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
