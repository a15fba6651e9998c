"""Box quality: pixel IoU, token-grid IoU in the evaluation view, and the summary JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mofo.motion.quality import (
    box_iou,
    camera_moves,
    evaluation_view,
    token_cells,
    token_grid_iou,
    write_box_quality,
)

FRAME = (96, 128)  # (height, width)


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching, x2 exclusive
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0  # empty boxes


def test_evaluation_view_matches_resize_short_side_and_centre_crop():
    sx, sy, x0, y0 = evaluation_view(FRAME, 64)
    assert (sx, sy) == (pytest.approx(85 / 128), pytest.approx(64 / 96))  # 128 * 2/3 = 85.3 -> 85
    assert (x0, y0) == (10, 0)
    _, _, x0, y0 = evaluation_view((300, 200), 100)  # portrait: 100 x 150, crop rows 25..125
    assert (x0, y0) == (0, 25)


def to_frame(crop_box):
    """Crop-pixel box -> frame-pixel box for FRAME and input 64."""
    sx, sy, x0, y0 = evaluation_view(FRAME, 64)
    x1, y1, x2, y2 = crop_box
    return ((x1 + x0) / sx, (y1 + y0) / sy, (x2 + x0) / sx, (y2 + y0) / sy)


def test_token_cells_and_token_grid_iou():
    cells = token_cells(np.array([to_frame((1, 1, 15, 7))]), FRAME, 64, 8)
    assert cells.shape == (1, 8, 8)
    assert np.argwhere(cells[0]).tolist() == [[0, 0], [0, 1]]
    a, b = to_frame((1, 1, 15, 7)), to_frame((9, 1, 23, 7))  # cells {0,1} vs {1,2}
    assert token_grid_iou(a, b, FRAME, 64, 8) == pytest.approx(1 / 3)
    assert token_grid_iou(a, a, FRAME, 64, 8) == 1.0
    # two boxes in the part of the frame the centre crop cuts away agree: both cover nothing
    assert token_grid_iou((0, 0, 5, 5), (1, 1, 6, 6), FRAME, 64, 8) == 1.0
    assert token_grid_iou((0, 0, 5, 5), (40, 40, 60, 60), FRAME, 64, 8) == 0.0


def test_camera_moves():
    assert [camera_moves(v) for v in ["none", "pan", "shake", "False", True, 0]] == [
        False,
        True,
        True,
        False,
        True,
        False,
    ]


@pytest.fixture
def shard(tmp_path):
    """Two clips with ground truth: 'still_cam' (our boxes exact) and 'panning' (ours off by
    half a box), plus a clip without ground truth; raw-flow boxes are the full frame."""
    from mofo.formats.framestore import FrameStoreWriter

    prefix = tmp_path / "frames" / "shard-0000"
    with FrameStoreWriter(prefix) as writer:
        for clip_id in ["still_cam", "panning", "no_gt"]:
            writer.begin_clip(clip_id, src_height=FRAME[0], src_width=FRAME[1], fps=12.0)
            writer.add_frames(np.zeros((2, 48, 64, 3), np.uint8))
            writer.end_clip()
    gt_box = (40, 30, 80, 70)
    gt = pd.DataFrame(
        [(c, f, *gt_box) for c in ["still_cam", "panning"] for f in range(2)],
        columns=["clip_id", "frame", "x1", "y1", "x2", "y2"],
    )
    ours = pd.DataFrame(
        [("still_cam", f, *gt_box, True, "detected") for f in range(2)]
        + [("panning", f, 60, 30, 100, 70, True, "detected") for f in range(2)]
        + [("no_gt", f, 0, 0, 10, 10, False, "centre") for f in range(2)],
        columns=["clip_id", "frame", "x1", "y1", "x2", "y2", "detected", "source"],
    )
    raw = ours.assign(x1=0, y1=0, x2=FRAME[1], y2=FRAME[0])
    clips = pd.DataFrame(
        {
            "clip_id": ["still_cam", "panning", "no_gt"],
            "video_path": ["a.mp4", "b.mp4", "c.mp4"],
            "camera_motion": ["none", "pan", "none"],
        }
    )
    paths = {k: tmp_path / f"{k}.csv" for k in ["gt", "ours", "raw", "clips"]}
    gt.to_csv(paths["gt"], index=False)
    ours.to_csv(paths["ours"], index=False)
    raw.to_csv(paths["raw"], index=False)
    clips.to_csv(paths["clips"], index=False)
    (tmp_path / "ours.report.json").write_text(
        json.dumps(
            {"clips": 3, "frames": 6, "detected": 4, "centre": 2, "raw_flow": {"detected": 6}}
        )
    )
    return paths, prefix


def test_box_quality_scores_and_splits_by_camera_motion(tmp_path, shard):
    paths, prefix = shard
    model_cfg = {"input_size": 64, "patch_size": 8}
    out = tmp_path / "motion" / "box_quality.json"
    result = write_box_quality(
        out,
        [paths["ours"]],
        paths["clips"],
        paths["gt"],
        model_cfg,
        raw_flow_boxes=[paths["raw"]],
        frames_prefixes=[prefix],
    )
    assert json.loads(out.read_text()) == result
    assert result["n_clips"] == 2 and result["n_frames"] == 4
    shifted = box_iou((60, 30, 100, 70), (40, 30, 80, 70))  # 1/3
    assert result["mean_iou"] == pytest.approx((1 + shifted) / 2)
    assert result["by_camera_motion"]["false"]["mean_iou"] == pytest.approx(1.0)
    assert result["by_camera_motion"]["true"]["mean_iou"] == pytest.approx(shifted)
    assert result["by_camera_motion"]["true"]["token_grid_iou"] < 1.0
    assert result["by_camera_motion_kind"]["pan"]["n_clips"] == 1
    full = box_iou((0, 0, 128, 96), (40, 30, 80, 70))
    assert result["raw_flow_mean_iou"] == pytest.approx(full)
    assert result["centre_box_mean_iou"] == pytest.approx(
        box_iou((32, 24, 96, 72), (40, 30, 80, 70))
    )
    assert result["fallbacks"]["centre"] == 2 and result["fallbacks"]["raw_flow"]["detected"] == 6


def test_box_quality_names_a_missing_file(tmp_path, shard):
    paths, prefix = shard
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        write_box_quality(
            tmp_path / "q.json",
            [tmp_path / "nope.csv"],
            paths["clips"],
            paths["gt"],
            {"input_size": 64, "patch_size": 8},
            frames_prefixes=[prefix],
        )


def test_without_ground_truth_only_counts(tmp_path):
    """Real datasets have no ground-truth boxes: the report still counts clips and fallbacks."""
    import json as _json

    from mofo.motion.quality import box_quality

    boxes = tmp_path / "shard-0000.csv"
    boxes.write_text(
        "clip_id,frame,x1,y1,x2,y2,detected,source\n"
        "a,0,1,1,5,5,True,detected\na,1,1,1,5,5,False,previous\nb,0,0,0,4,4,True,detected\n"
    )
    (tmp_path / "shard-0000.report.json").write_text(_json.dumps({"clips": 2, "frames": 3, "previous": 1}))
    result = box_quality([boxes], None, None, {"input_size": 32, "patch_size": 8})
    assert result["n_clips"] == 2 and result["n_frames"] == 3 and result["ground_truth"] is None
    assert result["fallbacks"]["previous"] == 1
