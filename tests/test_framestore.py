"""The JPEG frame store: writer/reader round trip, partial reads, errors, pickling, atomicity."""

from __future__ import annotations

import pickle

# Required packages, imported directly: a broken install must fail here, not skip.
import cv2  # noqa: F401
import numpy as np
import pandas as pd
import pytest

from mofo.formats import framestore as fs
from mofo.formats.framestore import (
    INDEX_COLUMNS,
    DecodedFrameCache,
    FrameStore,
    FrameStoreError,
    FrameStoreWriter,
    index_path,
    pack_path,
)
from tests.videofixtures import make_frames, psnr


def _write(prefix, clips: dict[str, np.ndarray], quality: int = 90) -> None:
    with FrameStoreWriter(prefix, jpeg_quality=quality) as writer:
        for cid, frames in clips.items():
            writer.begin_clip(
                cid, src_height=frames.shape[1] * 2, src_width=frames.shape[2] * 2, fps=25.0
            )
            writer.add_frames(frames[:3])
            writer.add_frames(frames[3:])
            writer.end_clip()


def test_round_trip_partial_reads_and_meta(tmp_path):
    prefix = tmp_path / "shard-0000"
    a, b = make_frames(7, 48, 64, seed=1), make_frames(5, 32, 40, seed=2)
    _write(prefix, {"clip_a": a, "clip_b": b})
    store = FrameStore(prefix)
    assert store.clip_ids == ["clip_a", "clip_b"] and len(store) == 2 and "clip_a" in store
    assert store.num_frames("clip_a") == 7 and store.num_frames("clip_b") == 5
    assert store.meta("clip_b") == dict(
        height=32, width=40, src_height=64, src_width=80, fps=25.0, n_frames=5
    )
    full = store.read("clip_a")
    assert full.shape == (7, 48, 64, 3) and full.dtype == np.uint8
    assert (
        psnr(full, a) > 30
    )  # JPEG q90 (4:2:0 chroma on sharp edges); also catches an RGB/BGR swap
    some = store.read("clip_a", [5, 0, -1])
    assert np.array_equal(some, full[[5, 0, 6]])
    assert np.array_equal(store.read("clip_b", np.array([2])), store.read("clip_b")[2:3])
    index = pd.read_csv(index_path(prefix))
    assert list(index.columns) == INDEX_COLUMNS
    assert index["frame"].tolist() == list(range(7)) + list(range(5))
    assert int(index["nbytes"].sum()) == pack_path(prefix).stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


def test_colour_order_is_rgb(tmp_path):
    red = np.zeros((2, 16, 16, 3), np.uint8)
    red[..., 0] = 255
    _write(tmp_path / "s", {"red": red})
    pixel = FrameStore(tmp_path / "s").read("red", [0])[0, 8, 8]
    assert pixel[0] > 240 and pixel[2] < 15


def test_unknown_clip_and_bad_index_name_the_store(tmp_path):
    prefix = tmp_path / "shard-0007"
    _write(prefix, {"c": make_frames(3, 16, 16)})
    store = FrameStore(prefix)
    with pytest.raises(KeyError, match="nope.*shard-0007"):
        store.read("nope")
    with pytest.raises(KeyError, match="shard-0007"):
        store.meta("nope")
    with pytest.raises(IndexError, match="3 frames"):
        store.read("c", [3])


def test_aborted_clip_leaves_no_bytes_and_failed_writer_leaves_no_files(tmp_path):
    prefix = tmp_path / "s"
    with FrameStoreWriter(prefix) as writer:
        writer.begin_clip("bad", 16, 16, 12.0)
        writer.add_frames(make_frames(4, 16, 16))
        writer.abort_clip()
        writer.begin_clip("good", 16, 16, 12.0)
        writer.add_frames(make_frames(2, 16, 16))
        writer.end_clip()
    store = FrameStore(prefix)
    assert store.clip_ids == ["good"]
    assert int(pd.read_csv(index_path(prefix))["offset"].min()) == 0
    with pytest.raises(RuntimeError, match="boom"), FrameStoreWriter(tmp_path / "t") as writer:
        writer.begin_clip("x", 16, 16, 12.0)
        writer.add_frames(make_frames(2, 16, 16))
        raise RuntimeError("boom")
    assert not pack_path(tmp_path / "t").exists() and not index_path(tmp_path / "t").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_pickle_drops_the_memmap_and_reopens(tmp_path):
    prefix = tmp_path / "s"
    frames = make_frames(4, 24, 32)
    _write(prefix, {"c": frames})
    store = FrameStore(prefix)
    before = store.read("c", [1])
    assert store._mm is not None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._mm is None
    assert np.array_equal(clone.read("c", [1]), before)


def test_the_decoded_frame_cache_serves_repeats_and_keeps_to_its_budget(tmp_path, monkeypatch):
    prefix = tmp_path / "s"
    frames = make_frames(6, 24, 32)
    _write(prefix, {"c": frames, "d": frames[::-1].copy()})
    plain = FrameStore(prefix)
    frame_mb = 24 * 32 * 3 / 2**20
    cache = DecodedFrameCache(4.5 * frame_mb)  # room for 4 frames
    store = FrameStore(prefix, cache)
    decoded = []
    real = fs.decode_jpeg
    monkeypatch.setattr(fs, "decode_jpeg", lambda data: decoded.append(1) or real(data))
    first = store.read("c", [0, 1, 2])
    assert len(decoded) == 3 and len(cache) == 3
    again = store.read("c", [2, 0, 1, 0])  # all four from the cache
    assert len(decoded) == 3
    assert np.array_equal(again, plain.read("c", [2, 0, 1, 0]))
    assert np.array_equal(first, plain.read("c", [0, 1, 2]))
    first[2] = 0  # a reader's output is its own: the cached frame stays intact
    assert np.array_equal(store.read("c", [2]), plain.read("c", [2]))
    store.read("d", [0, 1])  # 5 frames do not fit: the least recently used (c/1) goes
    assert len(cache) == 4 and cache.used <= cache.budget
    assert cache.get((str(prefix), "c", 1)) is None and cache.get((str(prefix), "c", 2)) is not None
    assert np.array_equal(store.read("d", [0, 1]), plain.read("d", [0, 1]))
    clone = pickle.loads(pickle.dumps(cache))  # a worker gets the budget, not the frames
    assert len(clone) == 0 and clone.used == 0 and clone.budget == cache.budget
    n = len(decoded)
    FrameStore(prefix, DecodedFrameCache(0)).read("c", [0, 0])
    assert len(decoded) == n + 2  # budget 0: nothing kept
    with pytest.raises(ValueError, match=">= 0 MiB"):
        DecodedFrameCache(-1)


def test_empty_store_is_valid(tmp_path):
    with FrameStoreWriter(tmp_path / "empty"):
        pass
    store = FrameStore(tmp_path / "empty")
    assert store.clip_ids == [] and len(store) == 0
    assert pack_path(tmp_path / "empty").stat().st_size == 0


def test_inconsistent_or_missing_files_are_reported(tmp_path):
    prefix = tmp_path / "s"
    _write(prefix, {"c": make_frames(3, 16, 16)})
    data = pack_path(prefix).read_bytes()
    pack_path(prefix).write_bytes(data[: len(data) // 2])
    with pytest.raises(FrameStoreError, match="past the end"):
        FrameStore(prefix)
    pack_path(prefix).unlink()
    with pytest.raises(FrameStoreError, match="pack not found"):
        FrameStore(prefix)
    with pytest.raises(FrameStoreError, match="index not found"):
        FrameStore(tmp_path / "other")
    index_path(prefix).write_text("clip_id,frame\nc,0\n")
    with pytest.raises(FrameStoreError, match="missing columns"):
        FrameStore(prefix)
