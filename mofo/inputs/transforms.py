"""Spatial transforms of a clip that move its motion boxes with the pixels.

Every function takes ``frames`` (uint8 ``(T, H, W, 3)`` RGB) and ``boxes`` (float ``(T, 4)``
``x1, y1, x2, y2`` per frame, in pixels of ``frames``, ``x2``/``y2`` exclusive) and returns both
transformed, so a box can never drift from the pixels it marks. Coordinates are continuous:
pixel ``i`` covers ``[i, i + 1)``, so a resize by ``s`` maps ``x`` to ``x·s`` (OpenCV's and
PIL's pixel-centre convention). After each geometric step, boxes are clipped to the image; a
box that leaves the image entirely becomes the empty box ``(0, 0, 0, 0)``, which the masking
code reads as "no in-box tokens".

Randomness comes only from the ``numpy.random.Generator`` passed in (the loader seeds one per
sample), so a clip is transformed the same way for the same seed in any worker. The crop
geometry is written here (not with torchvision) for that reason and because torchvision's
crops do not carry boxes. RandAugment and random erasing are timm's; they draw from Python's,
NumPy's and torch's global generators, which :func:`seeded_global_random` seeds from the
sample's generator and restores afterwards.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import _LEVEL_DENOM, AugmentOp, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

EMPTY_BOX = np.zeros(4, dtype=np.float32)

# VideoMAE's GroupMultiScaleCrop "more_fix_crop" grid: (column, row) in quarter steps of the
# free space: 4 corners, centre, then 8 more (edge midpoints and inner quarter points).
_FIXED_OFFSETS = (
    (0, 0), (4, 0), (0, 4), (4, 4), (2, 2),
    (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3),
)


# --------------------------------------------------------------------------- boxes


def as_boxes(boxes: np.ndarray, num_frames: int) -> np.ndarray:
    """Check and copy boxes to float32 ``(T, 4)``; the error says what is wrong."""
    arr = np.asarray(boxes, dtype=np.float32)
    if arr.shape != (num_frames, 4):
        raise ValueError(f"boxes must have shape ({num_frames}, 4), got {arr.shape}")
    return arr.copy()


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip boxes to ``[0, width] x [0, height]``; boxes with no area left become empty."""
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, height)
    empty = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
    out[empty] = EMPTY_BOX
    return out


def box_is_empty(boxes: np.ndarray) -> np.ndarray:
    """Bool ``(T,)``: which boxes have no area."""
    boxes = np.asarray(boxes)
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def _affine_boxes(boxes: np.ndarray, matrix: np.ndarray, width: float, height: float) -> np.ndarray:
    """Map boxes through a 2x3 affine (input -> output); result: bounding box of the 4 corners.

    For a rectangle under an affine map the corners' bounding box is exactly the bounding
    box of the mapped region, so nothing is lost but the (inevitable) axis-aligned slack.
    """
    empty = box_is_empty(boxes)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    corners = np.stack(
        [np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x1, y2], 1), np.stack([x2, y2], 1)],
        axis=1,
    )  # (T, 4 corners, 2)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    out = np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1).astype(np.float32)
    out[empty] = EMPTY_BOX
    return clip_boxes(out, width, height)


# --------------------------------------------------------------------------- geometry


def _resize_frames(frames: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Resize every frame; INTER_AREA when shrinking (no aliasing), bilinear when enlarging."""
    height, width = frames.shape[1:3]
    if (out_w, out_h) == (width, height):
        return frames
    interp = cv2.INTER_AREA if out_w * out_h < width * height else cv2.INTER_LINEAR
    out = np.empty((frames.shape[0], out_h, out_w, frames.shape[3]), dtype=frames.dtype)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame, (out_w, out_h), interpolation=interp)
    return out


def crop_resize(
    frames: np.ndarray,
    boxes: np.ndarray,
    x0: int,
    y0: int,
    crop_w: int,
    crop_h: int,
    out_w: int | None = None,
    out_h: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``[x0, x0+crop_w) x [y0, y0+crop_h)`` from every frame, then resize to ``out_w x out_h``.

    The crop must lie inside the frame. ``out_w``/``out_h`` default to the crop size.
    """
    height, width = frames.shape[1:3]
    if crop_w < 1 or crop_h < 1 or x0 < 0 or y0 < 0 or x0 + crop_w > width or y0 + crop_h > height:
        raise ValueError(
            f"crop x0={x0} y0={y0} w={crop_w} h={crop_h} does not fit a {width}x{height} frame"
        )
    boxes = as_boxes(boxes, frames.shape[0])
    out_w = crop_w if out_w is None else out_w
    out_h = crop_h if out_h is None else out_h
    cropped = frames[:, y0 : y0 + crop_h, x0 : x0 + crop_w]
    empty = box_is_empty(boxes)
    boxes = clip_boxes(boxes - np.array([x0, y0, x0, y0], dtype=np.float32), crop_w, crop_h)
    boxes[empty] = EMPTY_BOX
    boxes *= np.array([out_w / crop_w, out_h / crop_h] * 2, dtype=np.float32)
    boxes = clip_boxes(boxes, out_w, out_h)  # float32 rounding may step a hair past the edge
    return np.ascontiguousarray(_resize_frames(cropped, out_w, out_h)), boxes


def resize(frames: np.ndarray, boxes: np.ndarray, out_w: int, out_h: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize the whole frames to ``out_w x out_h``."""
    height, width = frames.shape[1:3]
    return crop_resize(frames, boxes, 0, 0, width, height, out_w, out_h)


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(out_w, out_h)`` of :func:`resize_short_side`: the shorter side becomes ``size``, the
    longer one keeps the aspect ratio (rounded, never below ``size``)."""
    scale = size / min(height, width)
    out_w = size if width <= height else max(size, round(width * scale))
    out_h = size if height < width else max(size, round(height * scale))
    return out_w, out_h


def resize_short_side(frames: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio."""
    height, width = frames.shape[1:3]
    out_w, out_h = short_side_size(width, height, size)
    return resize(frames, boxes, out_w, out_h)


def center_crop(frames: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The centred ``size x size`` crop (frames must be at least ``size`` on both sides)."""
    return spatial_crop(frames, boxes, size, crop_idx=0, num_crops=1)


def spatial_crop(
    frames: np.ndarray, boxes: np.ndarray, size: int, crop_idx: int, num_crops: int
) -> tuple[np.ndarray, np.ndarray]:
    """Test crop ``crop_idx`` of ``num_crops`` square ``size`` crops along the longer side.

    One crop: the centre. Three crops (VideoMAE's multi-view test): left/centre/right for a
    landscape frame, top/middle/bottom for a portrait one; ``num_crops`` crops in general are
    spread evenly from one end to the other. The shorter side is centred.
    """
    height, width = frames.shape[1:3]
    x0, y0 = spatial_crop_offset(width, height, size, crop_idx, num_crops)
    return crop_resize(frames, boxes, x0, y0, size, size)


def spatial_crop_offset(
    width: int, height: int, size: int, crop_idx: int = 0, num_crops: int = 1
) -> tuple[int, int]:
    """``(x0, y0)`` of :func:`spatial_crop`'s crop ``crop_idx`` of ``num_crops`` in a
    ``width x height`` frame (the defaults: :func:`center_crop`'s)."""
    if size > min(height, width):
        raise ValueError(f"crop size {size} is larger than the {width}x{height} frame")
    if not 0 <= crop_idx < num_crops:
        raise ValueError(f"crop_idx must be in [0, {num_crops}), got {crop_idx}")
    free_x, free_y = width - size, height - size
    if num_crops == 1:
        return free_x // 2, free_y // 2
    if width >= height:
        return round(free_x * crop_idx / (num_crops - 1)), free_y // 2
    return free_x // 2, round(free_y * crop_idx / (num_crops - 1))


def multi_scale_crop_params(
    width: int,
    height: int,
    input_size: int,
    scales: Sequence[float],
    rng: np.random.Generator,
    max_distort: int = 1,
    fix_crop: bool = True,
    more_fix_crop: bool = True,
) -> tuple[int, int, int, int]:
    """VideoMAE's GroupMultiScaleCrop choice of crop: ``(x0, y0, crop_w, crop_h)``.

    Candidate sides are ``int(short_side · s)`` for each scale ``s`` (snapped to
    ``input_size`` when within 3 px); width and height are drawn as a pair whose scale
    indices differ by at most ``max_distort``. The offset is one of the fixed corner /
    centre positions (``fix_crop``; 13 with ``more_fix_crop``, else 5) or uniform.
    """
    base = min(width, height)
    sides = [int(base * s) for s in scales]
    sides = [input_size if abs(side - input_size) < 3 else side for side in sides]
    pairs = [
        (w, h)
        for i, h in enumerate(sides)
        for j, w in enumerate(sides)
        if abs(i - j) <= max_distort and 0 < w <= width and 0 < h <= height
    ]
    if not pairs:
        raise ValueError(f"no multi-scale crop of scales {list(scales)} fits a {width}x{height} frame")
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    if not fix_crop:
        x0 = int(rng.integers(0, width - crop_w + 1))
        y0 = int(rng.integers(0, height - crop_h + 1))
        return x0, y0, crop_w, crop_h
    offsets = _FIXED_OFFSETS if more_fix_crop else _FIXED_OFFSETS[:5]
    col, row = offsets[int(rng.integers(len(offsets)))]
    step_x, step_y = (width - crop_w) // 4, (height - crop_h) // 4
    return col * step_x, row * step_y, crop_w, crop_h


def multi_scale_crop(
    frames: np.ndarray,
    boxes: np.ndarray,
    input_size: int,
    scales: Sequence[float],
    rng: np.random.Generator,
    max_distort: int = 1,
    fix_crop: bool = True,
    more_fix_crop: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """VideoMAE pretraining crop: a multi-scale crop resized to ``input_size x input_size``."""
    height, width = frames.shape[1:3]
    x0, y0, cw, ch = multi_scale_crop_params(
        width, height, input_size, scales, rng, max_distort, fix_crop, more_fix_crop
    )
    return crop_resize(frames, boxes, x0, y0, cw, ch, input_size, input_size)


def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style crop ``(x0, y0, crop_w, crop_h)``: area fraction in ``scale``,
    aspect ratio (w/h, log-uniform) in ``ratio``; 10 tries, then the largest centred crop
    with the ratio clamped to ``ratio`` (the same rule as torchvision's RandomResizedCrop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            x0 = int(rng.integers(0, width - crop_w + 1))
            y0 = int(rng.integers(0, height - crop_h + 1))
            return x0, y0, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def random_resized_crop(
    frames: np.ndarray,
    boxes: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tuning crop (VideoMAE's ``random_resized_crop``), resized to ``size x size``."""
    height, width = frames.shape[1:3]
    x0, y0, cw, ch = random_resized_crop_params(width, height, rng, scale, ratio)
    return crop_resize(frames, boxes, x0, y0, cw, ch, size, size)


def horizontal_flip(frames: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left/right: ``x1' = W - x2``, ``x2' = W - x1`` (empty boxes stay empty)."""
    width = frames.shape[2]
    boxes = as_boxes(boxes, frames.shape[0])
    empty = box_is_empty(boxes)
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    flipped[empty] = EMPTY_BOX
    return np.ascontiguousarray(frames[:, :, ::-1]), flipped


# --------------------------------------------------------------------------- tensors


def clip_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> uint8 tensor ``(3, T, H, W)`` (what the loader sends with
    ``engine.uint8_frames``: a quarter of the float32 clip's bytes)."""
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)


def normalize_clip(
    clip: torch.Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """uint8 clip(s) ``(..., 3, T, H, W)`` on any device -> float32 ``(x/255 - mean) / std``
    on that device. The same operations in the same order wherever it runs, so the loader's
    CPU normalisation and the device's give the same values on a CPU."""
    shape = (3, 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=clip.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=clip.device).view(shape)
    return clip.float().div_(255.0).sub_(mean_t).div_(std_t).contiguous()


def normalize(
    frames: np.ndarray,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 tensor ``(3, T, H, W)``, ``(x/255 - mean) / std``."""
    return normalize_clip(clip_tensor(frames), mean, std)


@contextlib.contextmanager
def seeded_global_random(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's (CPU) global generators, restore them on exit.

    timm's RandAugment and RandomErasing draw from those globals; seeding them from the
    sample's own generator makes them reproducible without disturbing anyone else's stream.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# --------------------------------------------------------------------------- RandAugment

# RandAugment ops that move pixels, and the affine (input -> output, continuous pixel
# coordinates) that timm's op applies for its level argument. PIL's AFFINE data maps output
# to input, so these are the inverses of the matrices timm hands to PIL.
_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


def augment_op_affine(name: str, level_args: tuple, width: int, height: int) -> np.ndarray | None:
    """The 2x3 affine (input -> output pixels) of timm RandAugment op ``name``; None if the op
    does not move pixels."""
    if name not in _GEOMETRIC_OPS:
        return None
    (arg,) = level_args
    if name == "Rotate":
        # PIL rotates counter-clockwise (as seen on screen, y down) about the image centre.
        theta = math.radians(arg)
        cos, sin = math.cos(theta), math.sin(theta)
        cx, cy = width / 2.0, height / 2.0
        return np.array(
            [[cos, sin, cx - cos * cx - sin * cy], [-sin, cos, cy + sin * cx - cos * cy]]
        )
    if name == "ShearX":  # output (x, y) shows input (x + f·y, y)
        return np.array([[1.0, -arg, 0.0], [0.0, 1.0, 0.0]])
    if name == "ShearY":  # output (x, y) shows input (x, f·x + y)
        return np.array([[1.0, 0.0, 0.0], [-arg, 1.0, 0.0]])
    shift = {
        "TranslateX": (arg, 0.0),
        "TranslateY": (0.0, arg),
        "TranslateXRel": (arg * width, 0.0),
        "TranslateYRel": (0.0, arg * height),
    }[name]
    # output (x, y) shows input (x + dx, y + dy): the content moves by -d.
    return np.array([[1.0, 0.0, -shift[0]], [0.0, 1.0, -shift[1]]])


def _draw_op_args(op: AugmentOp) -> tuple | None:
    """One draw of timm's AugmentOp randomness: None when the op is skipped, else its level
    arguments. Mirrors ``AugmentOp.__call__`` (timm draws these per image; a clip needs one
    draw shared by all its frames and the boxes, so the draw is done here). It reads timm
    internals, hence timm's pin in pyproject.toml and the check in tests/test_envs.py."""
    if op.prob < 1.0 and random.random() > op.prob:
        return None
    magnitude = op.magnitude
    if op.magnitude_std > 0:
        if op.magnitude_std == float("inf"):
            magnitude = random.uniform(0, magnitude)
        else:
            magnitude = random.gauss(magnitude, op.magnitude_std)
    upper = op.magnitude_max or _LEVEL_DENOM
    magnitude = max(0.0, min(magnitude, upper))
    return op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()


class VideoRandAugment:
    """timm RandAugment applied with the same ops and magnitudes to every frame of a clip,
    and the geometric ops (rotate, shear, translate) applied to the boxes too.

    ``config_str`` is timm's (``"rand-m7-n4-mstd0.5-inc1"`` in VideoMAE's fine-tuning). The
    hyper-parameters follow VideoMAE: translate limit 45% of ``input_size``, fill with the
    ImageNet mean colour, bicubic resampling.
    """

    def __init__(self, config_str: str, input_size: int):
        hparams = {
            "translate_const": int(input_size * 0.45),
            "img_mean": tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN),
            "interpolation": Image.BICUBIC,
        }
        try:
            self.rand_augment = rand_augment_transform(config_str, hparams)
        except (AssertionError, ValueError, KeyError) as err:
            raise ValueError(f"bad RandAugment config string {config_str!r}: {err}") from err
        self.config_str = config_str

    def __call__(
        self, frames: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        boxes = as_boxes(boxes, frames.shape[0])
        ra = self.rand_augment
        with seeded_global_random(int(rng.integers(2**63))):
            # Same op choice rule as timm's RandAugment.__call__.
            ops = np.random.choice(
                ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights
            )
            draws = [(op, _draw_op_args(op)) for op in ops]
        images = [Image.fromarray(frame) for frame in frames]
        for op, level_args in draws:
            if level_args is None:
                continue
            images, boxes = apply_augment_op(op, level_args, images, boxes)
        out = np.stack([np.asarray(img, dtype=np.uint8) for img in images])
        return out, boxes

    def __repr__(self) -> str:
        return f"VideoRandAugment({self.config_str!r})"


def apply_augment_op(
    op: AugmentOp, level_args: tuple, images: list[Image.Image], boxes: np.ndarray
) -> tuple[list[Image.Image], np.ndarray]:
    """Apply timm op ``op`` with fixed ``level_args`` to every PIL frame and to the boxes."""
    width, height = images[0].size
    out = [op.aug_fn(img, *level_args, **op.kwargs) for img in images]
    matrix = augment_op_affine(op.name, level_args, width, height)
    if matrix is not None:
        boxes = _affine_boxes(boxes, matrix, width, height)
    return out, boxes


# --------------------------------------------------------------------------- erasing


def random_erase(
    clip: torch.Tensor,
    probability: float,
    rng: np.random.Generator,
    mode: str = "pixel",
    max_count: int = 1,
) -> torch.Tensor:
    """timm's RandomErasing on a normalised clip ``(C, T, H, W)``, in place: with
    ``probability`` one rectangle (up to ``max_count``) is erased through all frames.

    VideoMAE hands the frames to timm as a batch, which erases a different rectangle in every
    frame; here the clip is one image of ``C·T`` channels, so the hole is the same in every
    frame (a tube), which keeps the erasing temporally consistent with the tube masking.
    """
    if probability <= 0:
        return clip
    channels, frames, height, width = clip.shape
    eraser = RandomErasing(probability=probability, mode=mode, max_count=max_count, device="cpu")
    with seeded_global_random(int(rng.integers(2**63))):
        eraser(clip.view(channels * frames, height, width))
    return clip
