"""Decoding into the frame store: round trip, resize, frame ranges, bad files, statuses."""

from __future__ import annotations

import warnings

# Required packages, imported directly: a broken install must fail here, not skip.
import av  # noqa: F401  (before decord: see mofo.data.video)
import cv2
import decord  # noqa: F401
import numpy as np
import pandas as pd
import pytest

from mofo.data.decode import STATUS_COLUMNS, decode_shard, read_status, status_path
from mofo.data.video import VideoReadError, frame_indices, iter_frames, probe, resized_size
from mofo.formats.framestore import FrameStore, index_path, pack_path
from tests.videofixtures import (
    make_frames,
    psnr,
    truncate_copy,
    write_no_frames,
    write_random_bytes,
    write_video,
)

CFG = {"short_side": 0, "jpeg_quality": 90, "max_frames": 0, "threads": 1}


def rows(*clips) -> pd.DataFrame:
    """Manifest-like rows from (clip_id, path[, start, stop, fps])."""
    out = []
    for clip in clips:
        cid, path, *rest = clip
        start, stop, fps = (list(rest) + [-1, -1, float("nan")][len(rest) :])[:3]
        out.append(
            dict(
                clip_id=cid,
                video_path=str(path),
                label=0,
                verb_class=-1,
                noun_class=-1,
                split="train",
                start_frame=start,
                stop_frame=stop,
                fps=fps,
                shard=0,
            )
        )
    return pd.DataFrame(out)


def numbered_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i is flat grey 20 + 8 i, so the decoded grey level tells the frame number."""
    levels = 20 + 8 * np.arange(n)
    return (
        np.broadcast_to(levels[:, None, None, None], (n, height, width, 3)).astype(np.uint8).copy()
    )


def frame_number(frame: np.ndarray) -> int:
    return int(round((frame.mean() - 20) / 8))


@pytest.mark.parametrize(
    "h, w, short, expected",
    [
        (240, 320, 96, (96, 128)),
        (320, 240, 96, (128, 96)),
        (1080, 1920, 224, (224, 398)),
        (96, 128, 96, (96, 128)),
        (100, 150, 0, (100, 150)),
        (48, 64, 96, (96, 128)),
        (101, 203, 50, (50, 100)),
    ],
)
def test_resized_size(h, w, short, expected):
    assert resized_size(h, w, short) == expected


def test_frame_indices_ranges_caps_and_errors():
    idx, note = frame_indices(10)
    assert idx.tolist() == list(range(10)) and note == ""
    assert frame_indices(10, 3, 5)[0].tolist() == [3, 4, 5]
    idx, note = frame_indices(10, 8, 12)
    assert idx.tolist() == [8, 9] and "clipped" in note
    assert frame_indices(100, 0, 99, max_frames=5)[0].tolist() == [0, 25, 50, 74, 99]
    assert frame_indices(4, max_frames=8)[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(VideoReadError, match="zero frames"):
        frame_indices(0)
    with pytest.raises(VideoReadError, match="past the end"):
        frame_indices(10, 10, 12)
    with pytest.raises(VideoReadError, match="stop_frame"):
        frame_indices(10, 5, 4)


def test_round_trip_mp4_and_status_files(tmp_path):
    frames = make_frames(12, 48, 64, seed=3)
    video = write_video(tmp_path / "a.mp4", frames, fps=12)
    info = probe(video)
    assert (info.n_frames, info.height, info.width, info.fps) == (12, 48, 64, 12.0)
    status = decode_shard(rows(("a", video)), tmp_path / "frames" / "shard-0000", CFG, min_frames=4)
    assert list(status.columns) == STATUS_COLUMNS
    assert status.iloc[0][["status", "n_frames"]].tolist() == ["ok", 12]
    store = FrameStore(tmp_path / "frames" / "shard-0000")
    back = store.read("a")
    assert back.shape == frames.shape
    assert psnr(back, frames) > 30  # x264 crf 18 + JPEG q90
    assert store.meta("a")["fps"] == 12.0 and store.meta("a")["src_height"] == 48
    on_disk = read_status(tmp_path / "frames" / "shard-0000")
    assert on_disk.equals(status)
    assert not list((tmp_path / "frames").glob("*.tmp"))


def test_resize_to_short_side_matches_cv2_inter_area(tmp_path):
    frames = make_frames(6, 96, 128, seed=4)
    video = write_video(tmp_path / "big.mp4", frames)
    decode_shard(rows(("big", video)), tmp_path / "s", dict(CFG, short_side=48), min_frames=2)
    store = FrameStore(tmp_path / "s")
    meta = store.meta("big")
    assert (meta["height"], meta["width"], meta["src_height"], meta["src_width"]) == (
        48,
        64,
        96,
        128,
    )
    expected = np.stack([cv2.resize(f, (64, 48), interpolation=cv2.INTER_AREA) for f in frames])
    assert psnr(store.read("big"), expected) > 30


def test_epic_style_frame_range_and_max_frames(tmp_path):
    video = write_video(tmp_path / "P01_01.mp4", numbered_frames(30))
    shard = rows(("seg", video, 10, 19, 50.0), ("tail", video, 25, 40), ("capped", video, 0, 29))
    cfg = dict(CFG, max_frames=0)
    status = decode_shard(shard.iloc[:2], tmp_path / "s", cfg, min_frames=2).set_index("clip_id")
    store = FrameStore(tmp_path / "s")
    assert [frame_number(f) for f in store.read("seg")] == list(range(10, 20))
    assert store.meta("seg")["fps"] == 50.0  # the manifest's fps wins over the container's
    assert [frame_number(f) for f in store.read("tail")] == list(range(25, 30))
    assert status.loc["tail", "status"] == "ok" and "clipped" in status.loc["tail", "message"]
    decode_shard(shard.iloc[2:], tmp_path / "c", dict(CFG, max_frames=4), min_frames=2)
    assert [frame_number(f) for f in FrameStore(tmp_path / "c").read("capped")] == [0, 10, 19, 29]


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_pyav_fallback_where_decord_fails(tmp_path, suffix):
    # decord 0.6 cannot convert frames 48 px wide ("The size must exactly match"); PyAV can
    video = write_video(tmp_path / f"narrow{suffix}", numbered_frames(20, 32, 48))
    status = decode_shard(
        rows(("n", video, 5, 14)), tmp_path / "s", dict(CFG, max_frames=0), min_frames=2
    )
    assert status["status"].tolist() == ["ok"]
    store = FrameStore(tmp_path / "s")
    assert [frame_number(f) for f in store.read("n")] == list(range(5, 15))
    assert store.meta("n")["fps"] == 12.0 and store.meta("n")["width"] == 48


def test_iter_frames_chunks_cover_the_range(tmp_path):
    video = write_video(tmp_path / "v.mp4", numbered_frames(20))
    _info, _idx, _, chunks = iter_frames(video, 2, 17, chunk=4)
    parts = list(chunks)
    assert [len(p) for p in parts] == [4, 4, 4, 4]
    assert [frame_number(f) for p in parts for f in p] == list(range(2, 18))


def test_bad_clips_fail_alone_and_good_ones_survive(tmp_path):
    good = write_video(tmp_path / "good.mp4", make_frames(10, 48, 64, seed=5))
    webm = write_video(tmp_path / "good.webm", make_frames(10, 48, 64, seed=6))
    short = write_video(tmp_path / "short.mp4", make_frames(3, 48, 64, seed=7))
    corrupt = write_random_bytes(tmp_path / "corrupt.mp4")
    half = truncate_copy(good, tmp_path / "half.mp4", 0.5)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    no_frames = write_no_frames(tmp_path / "noframes.mp4")
    shard = rows(
        ("good", good),
        ("missing", tmp_path / "missing.mp4"),
        ("corrupt", corrupt),
        ("half", half),
        ("empty", empty),
        ("noframes", no_frames),
        ("short", short),
        ("webm", webm),
        ("late", good, 20, 30),
    )
    status = decode_shard(shard, tmp_path / "s", CFG, min_frames=8).set_index("clip_id")
    assert status["status"].to_dict() == {
        "good": "ok",
        "missing": "failed",
        "corrupt": "failed",
        "half": "failed",
        "empty": "failed",
        "noframes": "failed",
        "short": "short",
        "webm": "ok",
        "late": "failed",
    }
    for cid, words in {"missing": "not found", "empty": "empty", "late": "past the end"}.items():
        assert words in status.loc[cid, "message"]
    for cid in ("missing", "corrupt", "half", "empty", "noframes", "late"):
        assert str(tmp_path) in status.loc[cid, "message"]  # the message names the file
        assert status.loc[cid, "n_frames"] == 0
    assert status.loc["short", "n_frames"] == 3
    store = FrameStore(tmp_path / "s")
    assert store.clip_ids == ["good", "short", "webm"]
    assert psnr(store.read("good"), make_frames(10, 48, 64, seed=5)) > 30
    assert psnr(store.read("webm"), make_frames(10, 48, 64, seed=6)) > 28
    assert store.num_frames("short") == 3


def test_all_failed_shard_still_writes_valid_outputs(tmp_path):
    shard = rows(("a", tmp_path / "nope.mp4"), ("b", write_random_bytes(tmp_path / "b.mp4")))
    with pytest.warns(RuntimeWarning, match="ALL 2 clips"):
        status = decode_shard(shard, tmp_path / "s", CFG)
    assert (status["status"] == "failed").all()
    assert pack_path(tmp_path / "s").exists() and index_path(tmp_path / "s").exists()
    assert status_path(tmp_path / "s").exists()
    assert len(FrameStore(tmp_path / "s")) == 0


def test_duplicate_clip_ids_are_refused(tmp_path):
    video = write_video(tmp_path / "a.mp4", make_frames(3))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="twice"):
        decode_shard(rows(("a", video), ("a", video)), tmp_path / "s", CFG)
