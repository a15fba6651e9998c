"""The real-footage box benchmark's machinery (mofo/bench/realboxes.py) on a tiny synthetic
clip: ground-truth interpolation, IoU, the known window transforms and the table. The real
run (`mofo bench boxes-real`) needs downloaded videos and is a benchmark command, not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mofo.bench import realboxes as rb
from mofo.config import load_config
from tests.videofixtures import make_frames, write_video

GROUND_TRUTH = Path(__file__).resolve().parents[1] / "benchmarks" / "real_boxes"

N_FRAMES, H, W = 16, 64, 96


def test_interpolation_is_linear_between_keys_and_constant_outside():
    keys = pd.DataFrame({"frame": [10, 20], "x1": [0, 10], "y1": [5, 5], "x2": [20, 40],
                         "y2": [30, 50]})
    got = rb.interpolate_boxes(keys, [5, 10, 15, 20, 25])
    np.testing.assert_allclose(got[:, 0], [0, 0, 5, 10, 10])
    np.testing.assert_allclose(got[:, 2], [20, 20, 30, 40, 40])
    np.testing.assert_allclose(got[:, 3], [30, 30, 40, 50, 50])
    np.testing.assert_allclose(got[:, 1], 5)


def test_the_benchmark_ground_truth_files_are_consistent():
    clips = rb.load_clips(GROUND_TRUTH / rb.CLIPS_FILE)
    keys = rb.load_keyframes(GROUND_TRUTH / rb.KEYFRAMES_FILE)
    assert len(clips) >= 6 and sum(c.camera_motion for c in clips) >= 2
    for c in clips:
        k = keys[c.clip]
        # Key boxes at the first and last frame of the segment, and every ~10 sampled frames.
        assert k["frame"].iloc[0] == c.first and k["frame"].iloc[-1] >= c.frames[-1]
        assert np.diff(k["frame"]).max() <= 10 * c.step


def test_pan_maps_a_box_back_exactly():
    frames = make_frames(N_FRAMES, H, W, seed=3)
    st = rb.InvarianceSettings(crop=0.75, pan_px=2.0)
    still, win = rb.window_transforms("still", N_FRAMES, (H, W), st)
    pan, win2 = rb.window_transforms("pan", N_FRAMES, (H, W), st)
    assert win == win2 == (48, 72)
    # The pan is a constant integer shift per frame (turning back at the frame edge).
    steps = np.abs(np.diff(pan[:, 1]))
    assert set(steps.tolist()) <= {2.0} and pan[:, 1].min() >= 0 and pan[:, 1].max() <= W - 72
    crops = rb.cut_windows(frames, pan, win)
    for t in (0, 5, N_FRAMES - 1):  # window pixel (u, v) = frame pixel (u + tx, v + ty)
        tx, ty = int(pan[t, 1]), int(pan[t, 2])
        np.testing.assert_array_equal(crops[t], frames[t, ty:ty + 48, tx:tx + 72])
    # A box in the moved window lands on the same frame pixels in still-window coordinates.
    box = np.array([[10.0, 7.0, 30.0, 20.0]] * N_FRAMES)
    back = rb.window_to_still(box, pan, still)
    expect = box + np.stack([pan[:, 1] - still[:, 1], pan[:, 2] - still[:, 2]] * 2, axis=1)
    np.testing.assert_allclose(back, expect)
    assert np.all(rb.box_iou_many(back, expect) == 1.0)


def test_zoom_and_shake_stay_inside_the_frame_and_invert():
    st = rb.InvarianceSettings(crop=0.8, zoom_rate=0.05, shake_px=5, seed=1)
    still, win = rb.window_transforms("still", 30, (H, W), st)
    for kind in ("zoom", "shake"):
        tr, _ = rb.window_transforms(kind, 30, (H, W), st)
        s, tx, ty = tr.T
        assert np.all(tx >= -1e-9) and np.all(ty >= -1e-9)
        assert np.all(tx + s * win[1] <= W + 1e-9) and np.all(ty + s * win[0] <= H + 1e-9)
        # The still window's own box maps to itself; a moved window's full box maps to the
        # part of the frame it shows.
        full = np.tile([0.0, 0.0, win[1], win[0]], (30, 1))
        np.testing.assert_allclose(rb.window_to_still(full, still, still), full)
        back = rb.window_to_still(full, tr, still)
        np.testing.assert_allclose(back[:, 2] - back[:, 0], s * win[1])
    zoom, _ = rb.window_transforms("zoom", 30, (H, W), st)
    assert zoom[:, 0].max() <= 1.2 + 1e-9 and zoom[:, 0].min() >= 0.75 - 1e-9
    np.testing.assert_allclose(zoom[1, 0] / zoom[0, 0], 1 / 1.05)


def test_area_share_inside_share_and_sources():
    assert rb.area_share(np.array([[0, 0, 48, 32]]), (64, 96)) == pytest.approx(0.25)
    gt = np.array([[0, 0, 40, 40]] * 3, float)
    boxes = np.array([[10, 10, 20, 20], [30, 0, 50, 10], [50, 50, 60, 60]], float)
    np.testing.assert_allclose(rb.inside_share(boxes, gt), [1.0, 0.5, 0.0])
    shares = rb.source_shares(["detected", "detected", "next", "previous"])
    assert shares["detected"] == 0.5 and shares["next"] == 0.25 and shares["centre"] == 0


def _tiny_benchmark(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = make_frames(N_FRAMES, H, W, seed=0, speed=3)
    write_video(videos / "tiny.mp4", frames, fps=12)
    (tmp_path / "clips.csv").write_text(
        "clip,package,file,first,last,step,camera_motion,box_covers\n"
        "moving_square,none,tiny.mp4,2,14,2,false,the yellow square\n"
        "same_but_moving_camera,none,tiny.mp4,0,15,3,true,the yellow square\n")
    # The square of make_frames: side 16, y0 = H // 3 = 21, x0 = 2 + 3 t. Keys every 6 frames
    # (linear in between, as the square moves).
    rows = ["clip,frame,x1,y1,x2,y2"]
    for clip, fr in (("moving_square", (2, 8, 14)), ("same_but_moving_camera", (0, 15))):
        rows += [f"{clip},{t},{2 + 3 * t},21,{18 + 3 * t},37" for t in fr]
    (tmp_path / "keyframes.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(overrides={"optical_flow": {"method": "dis", "scale": 1.0},
                                 "decode": {"short_side": 64}})
    return cfg, videos


def test_benchmark_runs_end_to_end_on_a_tiny_clip(tmp_path):
    cfg, videos = _tiny_benchmark(tmp_path)
    out = tmp_path / "out"
    st = rb.InvarianceSettings(crop=0.8, pan_px=2, shake_px=3)
    result = rb.run_benchmark(cfg, videos, tmp_path, out=out, settings=st, log=lambda m: None)
    assert [c["clip"] for c in result["clips"]] == ["moving_square", "same_but_moving_camera"]
    c = result["clips"][0]
    assert c["n_frames"] == 7 and c["source_hw"] == [H, W]
    # The detector's quality is not tested here (it has its own tests); the scoring is.
    assert 0 <= c["iou"]["ours"] <= 1 and 0 <= c["iou"]["raw"] <= 1
    gt = np.array([[2 + 3 * t, 21, 18 + 3 * t, 37] for t in range(2, 15, 2)], float)
    centre = np.tile([W // 4, H // 4, W - W // 4, H - H // 4], (7, 1))
    assert c["iou"]["centre"] == pytest.approx(float(np.mean(rb.box_iou_many(centre, gt))))
    assert 0 < c["area"]["ours"] < 0.5 and c["area"]["gt"] == pytest.approx(256 / (H * W))
    assert sum(c["sources"].values()) == pytest.approx(1.0)
    # Invariance only for the static-camera clip, with every transform scored.
    assert set(c["invariance"]) >= {"still", "pan", "zoom", "shake"}
    assert all(0 <= c["invariance"][k]["iou"] <= 1 for k in rb.TRANSFORMS)
    assert "invariance" not in result["clips"][1]
    # Per-frame IoU is box_iou_many of the written boxes.
    pf = pd.read_csv(out / "boxes-real.per_frame.csv")
    first = pf[pf["clip"] == "moving_square"]
    iou = rb.box_iou_many(first[[f"ours_{k}" for k in rb.COORDS]].to_numpy(),
                          first[[f"gt_{k}" for k in rb.COORDS]].to_numpy())
    np.testing.assert_allclose(iou, first["iou_ours"], atol=0.01)
    assert first["iou_ours"].mean() == pytest.approx(c["iou"]["ours"], abs=0.01)
    # GT in the file is the interpolation at the sampled frames (2, 4, ..., 14).
    np.testing.assert_allclose(first["gt_x1"], [2 + 3 * t for t in range(2, 15, 2)])
    # Outputs: JSON, table, pictures.
    data = json.loads((out / "boxes-real.json").read_text())
    assert data["summary"]["all"]["clips"] == 2 and data["summary"]["invariance"]["clips"] == 1
    md = (out / "boxes-real.md").read_text()
    assert md == rb.format_table(result)
    assert 0 <= c["inside_gt"]["ours"] <= 1
    assert "| moving_square | no | 7 |" in md and "| **mean** |" in md and "IoU pan" in md
    assert (out / "pictures" / "moving_square.png").stat().st_size > 0


def test_missing_videos_and_unknown_clips_are_named(tmp_path):
    cfg, videos = _tiny_benchmark(tmp_path)
    with pytest.raises(FileNotFoundError, match="fetch_real_clips"):
        rb.run_benchmark(cfg, tmp_path / "nowhere", tmp_path)
    with pytest.raises(ValueError, match="unknown clips"):
        rb.run_benchmark(cfg, videos, tmp_path, only=["nope"])


def test_cli_names_the_fetch_script_when_videos_are_missing(tmp_path, capsys):
    from mofo.cli import main

    rc = main(["bench", "boxes-real", "--flow", "dis", "--videos", str(tmp_path / "none"),
               "--ground-truth", str(GROUND_TRUTH), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "tools/fetch_real_clips.sh" in capsys.readouterr().err


def test_cli_names_the_ground_truth_option_when_its_folder_is_missing(tmp_path, capsys):
    """The default --ground-truth is relative to the repository root: started elsewhere, the
    error says which file is missing and how to point at it."""
    from mofo.cli import main

    rc = main(["bench", "boxes-real", "--flow", "dis", "--videos", str(tmp_path),
               "--ground-truth", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"ground truth not found: {tmp_path / 'nowhere' / 'clips.csv'}" in err
    assert "--ground-truth DIR" in err
