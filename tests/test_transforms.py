"""Boxes follow the pixels through every transform of mofo.inputs.transforms.

The check used throughout: draw a filled white box into black frames, transform frames and
boxes together, then compare the transformed box with the bounding box of the white pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.data.auto_augment import AugmentOp

from mofo.inputs import transforms as T


def draw_clip(width: int, height: int, box: tuple[int, int, int, int], num_frames: int = 2):
    """Black frames with a white filled ``box`` (x1, y1, x2, y2 exclusive) and its boxes array."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    frames[:, y1:y2, x1:x2] = 255
    boxes = np.tile(np.array(box, dtype=np.float32), (num_frames, 1))
    return frames, boxes


def bright_bbox(frame: np.ndarray, threshold: int = 128):
    """Bounding box (x1, y1, x2, y2 exclusive) of the pixels brighter than ``threshold``."""
    ys, xs = np.nonzero(frame.mean(axis=2) > threshold)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def assert_box_matches(frames: np.ndarray, boxes: np.ndarray, tol: float = 1.0):
    assert boxes.dtype == np.float32 and boxes.shape == (frames.shape[0], 4)
    height, width = frames.shape[1:3]
    for frame, box in zip(frames, boxes):
        assert 0 <= box[0] <= box[2] <= width and 0 <= box[1] <= box[3] <= height, box
        found = bright_bbox(frame)
        if found is None:  # nothing over the threshold: empty box, or a sliver under tol wide
            assert min(box[2] - box[0], box[3] - box[1]) <= tol, f"no box pixels left but box {box}"
            continue
        assert not T.box_is_empty(box[None])[0], f"box pixels {found} but empty box"
        np.testing.assert_allclose(box, found, atol=tol)


# ----------------------------------------------------------------------------- deterministic


def test_crop_resize_moves_and_scales_box():
    frames, boxes = draw_clip(128, 96, (30, 20, 70, 50))
    out, out_boxes = T.crop_resize(frames, boxes, 10, 5, 80, 60, 40, 30)
    assert out.shape == (2, 30, 40, 3)
    np.testing.assert_allclose(out_boxes[0], [10, 7.5, 30, 22.5])
    assert_box_matches(out, out_boxes)


def test_crop_clips_partial_box_and_empties_outside_box():
    frames, boxes = draw_clip(128, 96, (30, 20, 70, 50))
    out, out_boxes = T.crop_resize(frames, boxes, 50, 0, 60, 60)
    np.testing.assert_allclose(out_boxes[0], [0, 20, 20, 50])
    assert_box_matches(out, out_boxes, tol=0)
    out, out_boxes = T.crop_resize(frames, boxes, 80, 0, 48, 96)
    np.testing.assert_array_equal(out_boxes, np.zeros((2, 4), np.float32))
    assert bright_bbox(out[0]) is None


def test_crop_outside_frame_is_an_error():
    frames, boxes = draw_clip(64, 48, (1, 1, 5, 5))
    with pytest.raises(ValueError, match="does not fit"):
        T.crop_resize(frames, boxes, 10, 0, 60, 20)


def test_bad_boxes_shape_is_an_error():
    frames, _ = draw_clip(64, 48, (1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"boxes must have shape \(2, 4\)"):
        T.horizontal_flip(frames, np.zeros((3, 4)))


def test_resize_short_side_landscape_and_portrait():
    frames, boxes = draw_clip(128, 96, (32, 24, 64, 72))
    out, out_boxes = T.resize_short_side(frames, boxes, 48)
    assert out.shape[1:3] == (48, 64)
    np.testing.assert_allclose(out_boxes[0], [16, 12, 32, 36])
    assert_box_matches(out, out_boxes)
    frames, boxes = draw_clip(60, 100, (10, 20, 40, 90))
    out, out_boxes = T.resize_short_side(frames, boxes, 90)
    assert out.shape[1:3] == (150, 90)
    assert_box_matches(out, out_boxes)


def test_three_crops_left_centre_right():
    frames, boxes = draw_clip(120, 64, (0, 10, 20, 40))
    for idx in range(3):
        out, out_boxes = T.spatial_crop(frames, boxes, 64, idx, 3)
        assert out.shape[1:3] == (64, 64)
        assert_box_matches(out, out_boxes, tol=0)
    _, left = T.spatial_crop(frames, boxes, 64, 0, 3)
    _, centre = T.spatial_crop(frames, boxes, 64, 1, 3)
    _, right = T.spatial_crop(frames, boxes, 64, 2, 3)
    np.testing.assert_allclose(left[0], [0, 10, 20, 40])  # crop at x = 0
    assert T.box_is_empty(centre)[0]  # crop at x = 28: box x < 20 falls outside
    assert T.box_is_empty(right)[0]  # crop at x = 56
    # portrait: crops move along y
    frames, boxes = draw_clip(64, 120, (10, 100, 40, 120))
    _, bottom = T.spatial_crop(frames, boxes, 64, 2, 3)
    np.testing.assert_allclose(bottom[0], [10, 44, 40, 64])


def test_center_crop_and_too_large_crop():
    frames, boxes = draw_clip(100, 80, (40, 30, 60, 50))
    out, out_boxes = T.center_crop(frames, boxes, 60)
    np.testing.assert_allclose(out_boxes[0], [20, 20, 40, 40])
    assert_box_matches(out, out_boxes, tol=0)
    with pytest.raises(ValueError, match="larger than"):
        T.center_crop(frames, boxes, 90)


def test_horizontal_flip_is_exact_and_keeps_empty_boxes():
    frames, boxes = draw_clip(100, 50, (10, 5, 30, 25), num_frames=3)
    boxes[2] = 0
    out, out_boxes = T.horizontal_flip(frames, boxes)
    np.testing.assert_allclose(out_boxes[0], [70, 5, 90, 25])
    np.testing.assert_array_equal(out_boxes[2], [0, 0, 0, 0])
    assert_box_matches(out[:2], out_boxes[:2], tol=0)
    back, back_boxes = T.horizontal_flip(out, out_boxes)
    np.testing.assert_array_equal(back, frames)
    np.testing.assert_allclose(back_boxes[:2], boxes[:2])


def test_multi_scale_crop_follows_videomae_sizes():
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(200):
        x0, y0, cw, ch = T.multi_scale_crop_params(128, 96, 64, [1, 0.875, 0.75, 0.66], rng)
        sizes.add((cw, ch))
        # fixed offsets are multiples of a quarter of the free space
        assert x0 % ((128 - cw) // 4 or 1) == 0 and y0 % ((96 - ch) // 4 or 1) == 0
        assert x0 + cw <= 128 and y0 + ch <= 96
    # int(96 * s) = 96, 84, 72, 63 -> 64 (within 3 px of input_size); |i - j| <= 1
    sides = [96, 84, 72, 64]
    expected = {(sides[j], sides[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    assert sizes == expected


def test_normalize_values_and_layout():
    frames = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    frames[1, 2, 3] = [255, 128, 0]
    clip = T.normalize(frames)
    assert clip.shape == (3, 2, 4, 5) and clip.dtype == torch.float32
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(clip[:, 1, 2, 3], (torch.tensor([1.0, 128 / 255, 0.0]) - mean) / std)
    torch.testing.assert_close(clip[:, 0, 0, 0], -mean / std)


# ----------------------------------------------------------------------------- properties


@st.composite
def clip_with_box(draw):
    width = draw(st.integers(24, 90))
    height = draw(st.integers(24, 90))
    x1 = draw(st.integers(0, width - 4))
    y1 = draw(st.integers(0, height - 4))
    x2 = draw(st.integers(x1 + 4, width))
    y2 = draw(st.integers(y1 + 4, height))
    return width, height, (x1, y1, x2, y2)


@settings(max_examples=60, deadline=None)
@given(clip_with_box(), st.integers(0, 2**32 - 1), st.sampled_from([16, 32, 48]))
def test_random_resized_crop_boxes_follow_pixels(spec, seed, size):
    width, height, box = spec
    frames, boxes = draw_clip(width, height, box)
    out, out_boxes = T.random_resized_crop(frames, boxes, size, np.random.default_rng(seed))
    assert out.shape == (2, size, size, 3) and out.dtype == np.uint8
    # an upscaled box edge is blurred over ~one output pixel, and a sliver of the box thinner
    # than half a source pixel may vanish; the tolerance is one source pixel in output pixels
    _x0, _y0, cw, ch = T.random_resized_crop_params(width, height, np.random.default_rng(seed))
    tol = max(1.0, size / min(cw, ch))
    found = bright_bbox(out[0])
    box = out_boxes[0]
    if found is not None:
        assert not T.box_is_empty(out_boxes)[0], f"box pixels {found} but empty box"
        np.testing.assert_allclose(box, found, atol=tol)
    else:  # no pixel over the threshold: the box is empty or a sliver thinner than tol; when
        # shrinking, INTER_AREA averages, and a box under sqrt(2) output pixels a side that
        # straddles 2 x 2 pixels covers under half of each (all below the 128 threshold)
        assert min(box[2] - box[0], box[3] - box[1]) <= max(tol, 2**0.5), box


@settings(max_examples=60, deadline=None)
@given(clip_with_box(), st.integers(0, 2**32 - 1), st.booleans())
def test_multi_scale_crop_boxes_follow_pixels(spec, seed, fix_crop):
    width, height, box = spec
    frames, boxes = draw_clip(width, height, box)
    rng = np.random.default_rng(seed)
    out, out_boxes = T.multi_scale_crop(frames, boxes, 20, [1, 0.875, 0.75, 0.66], rng, fix_crop=fix_crop)
    assert out.shape == (2, 20, 20, 3)
    assert_box_matches(out, out_boxes, tol=1.0)


@settings(max_examples=40, deadline=None)
@given(clip_with_box(), st.integers(0, 2**32 - 1))
def test_same_seed_same_crop(spec, seed):
    width, height, box = spec
    frames, boxes = draw_clip(width, height, box)
    a = T.random_resized_crop(frames, boxes, 16, np.random.default_rng(seed))
    b = T.random_resized_crop(frames, boxes, 16, np.random.default_rng(seed))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ----------------------------------------------------------------------------- RandAugment


@pytest.mark.parametrize(
    "name,arg",
    [
        ("Rotate", 20.0), ("Rotate", -25.0), ("ShearX", 0.25), ("ShearX", -0.3),
        ("ShearY", 0.2), ("ShearY", -0.15), ("TranslateXRel", 0.3), ("TranslateXRel", -0.45),
        ("TranslateYRel", 0.2), ("TranslateX", -12.0), ("TranslateY", 30.0),
    ],
)
def test_geometric_rand_augment_ops_move_boxes(name, arg):
    frames, boxes = draw_clip(96, 80, (30, 25, 60, 50))
    op = AugmentOp(name, prob=1.0, magnitude=5, hparams={"interpolation": 2, "img_mean": (0, 0, 0)})
    from PIL import Image

    images, out_boxes = T.apply_augment_op(op, (arg,), [Image.fromarray(f) for f in frames], boxes)
    out = np.stack([np.asarray(i) for i in images])
    # corners of a rotated box are thinner than a pixel, so they may fall under the threshold
    assert_box_matches(out, out_boxes, tol=1.5 if name == "Rotate" else 1.0)


def test_colour_ops_leave_boxes_alone():
    frames, boxes = draw_clip(64, 48, (5, 6, 30, 40))
    op = AugmentOp("Invert", prob=1.0, magnitude=5)
    from PIL import Image

    _, out_boxes = T.apply_augment_op(op, (), [Image.fromarray(f) for f in frames], boxes)
    np.testing.assert_array_equal(out_boxes, boxes)


def test_video_rand_augment_same_ops_on_every_frame_and_reproducible():
    ra = T.VideoRandAugment("rand-m7-n4-mstd0.5-inc1", 64)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    frames = np.repeat(base, 4, axis=0)
    boxes = np.tile(np.array([10, 12, 40, 50], np.float32), (4, 1))
    changed = 0
    for seed in range(8):
        out, out_boxes = ra(frames, boxes, np.random.default_rng(seed))
        assert out.shape == frames.shape and out.dtype == np.uint8
        for t in range(1, 4):  # identical frames in -> identical frames out
            np.testing.assert_array_equal(out[t], out[0])
            np.testing.assert_array_equal(out_boxes[t], out_boxes[0])
        again, again_boxes = ra(frames, boxes, np.random.default_rng(seed))
        np.testing.assert_array_equal(again, out)
        np.testing.assert_array_equal(again_boxes, out_boxes)
        changed += int(not np.array_equal(out, frames))
    assert changed >= 6  # four ops at p=0.5 each: nearly every clip is changed


def test_video_rand_augment_does_not_touch_global_generators():
    import random

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    frames, boxes = draw_clip(32, 32, (4, 4, 20, 20))
    T.VideoRandAugment("rand-m7-n4-mstd0.5-inc1", 32)(frames, boxes, np.random.default_rng(0))
    T.random_erase(T.normalize(frames), 1.0, np.random.default_rng(0))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_bad_rand_augment_string():
    with pytest.raises(ValueError, match="bad RandAugment config string"):
        T.VideoRandAugment("augmix-m7", 64)


def test_random_erase_is_a_tube_and_reproducible():
    frames = np.full((4, 32, 32, 3), 200, dtype=np.uint8)
    clip = T.normalize(frames)
    reference = clip.clone()
    erased = T.random_erase(clip.clone(), 1.0, np.random.default_rng(3))
    changed = (erased != reference).any(dim=0)  # (T, H, W)
    assert changed.any()
    for t in range(1, 4):  # the same rectangle in every frame
        assert torch.equal(changed[t], changed[0])
    again = T.random_erase(clip.clone(), 1.0, np.random.default_rng(3))
    assert torch.equal(again, erased)
    untouched = T.random_erase(clip.clone(), 0.0, np.random.default_rng(3))
    assert torch.equal(untouched, reference)
