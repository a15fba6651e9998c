"""The JPEG frame store: one ``.jpgpack`` + ``.index.csv`` pair per shard.

Format (docs/ARCHITECTURE.md, "Frame store"):

* ``<prefix>.jpgpack`` - the JPEG files of every stored frame, concatenated, no header.
* ``<prefix>.index.csv`` - one row per frame: ``clip_id, frame, offset, nbytes, height,
  width, src_height, src_width, fps``. ``frame`` counts 0.. within the clip (the n-th stored
  frame, not the source frame number), ``offset``/``nbytes`` locate its JPEG in the pack,
  the other columns repeat the clip's metadata (stored size, original size, frame rate).

Frames are RGB in memory; JPEG stores them as BGR (OpenCV's order), the conversion happens
here and nowhere else. Both files are written to ``*.tmp`` and renamed into place on
``close()``, so a killed job never leaves a pack that looks complete.

Why JPEG in one pack: a 200k-clip dataset is ~10M frames; one file per frame overwhelms
cluster file systems, raw uint8 is ~10x larger. A memory-mapped pack lets a DataLoader read
only the frames it samples. Measured size (JPEG q90, demo "motion shapes" clips rendered at
each size; their noise texture makes them harder to compress than typical camera footage):
4.7 KiB per frame at 96x128 (raw 36 KiB, 7.7x smaller) and 21.5 KiB per frame at 224x298
(short side 224; raw 196 KiB, 9.1x smaller).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mofo.paths import beside

INDEX_COLUMNS = [
    "clip_id",
    "frame",
    "offset",
    "nbytes",
    "height",
    "width",
    "src_height",
    "src_width",
    "fps",
]
_INT_COLUMNS = ["frame", "offset", "nbytes", "height", "width", "src_height", "src_width"]


class FrameStoreError(RuntimeError):
    """A frame store is missing, inconsistent or lacks a clip; the message names the store."""


def pack_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.jpgpack`` (the name: ``mofo.paths.BESIDE``)."""
    return Path(beside(prefix, "frames_pack"))


def index_path(prefix: str | os.PathLike) -> Path:
    """``<prefix>.index.csv``."""
    return Path(beside(prefix, "frames_index"))


def encode_jpeg(frame_rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of one RGB uint8 frame (OpenCV encodes BGR, hence the swap)."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError(f"cv2.imencode failed for a frame of shape {frame_rgb.shape}")
    return buf.tobytes()


def decode_jpeg(data: np.ndarray | bytes) -> np.ndarray:
    """RGB uint8 frame from JPEG bytes."""
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    bgr = cv2.imdecode(arr, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("cv2.imdecode could not decode the JPEG bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FrameStoreWriter:
    """Append clips to a new frame store; ``close()`` makes it visible atomically.

    Usage::

        with FrameStoreWriter(prefix, jpeg_quality=90) as writer:
            writer.begin_clip("clip_a", src_height=240, src_width=320, fps=12.0)
            writer.add_frames(frames)          # any number of times
            writer.end_clip()                  # or writer.abort_clip() to drop it

    A clip that fails half-way is dropped with ``abort_clip()``: its bytes are truncated away.
    Leaving the ``with`` block through an exception discards everything (no files appear).
    """

    def __init__(self, prefix: str | os.PathLike, jpeg_quality: int = 90):
        self.prefix = str(prefix)
        self.quality = int(jpeg_quality)
        self._pack = pack_path(prefix)
        self._index = index_path(prefix)
        self._tmp_pack = Path(f"{self._pack}.tmp")
        self._tmp_index = Path(f"{self._index}.tmp")
        self._pack.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self._tmp_pack, "wb")
        self._rows: list[tuple] = []
        self._clip: dict | None = None
        self._clip_rows: list[tuple] = []
        self._clip_ids: set[str] = set()

    # -- clip level -------------------------------------------------------------------------
    def begin_clip(self, clip_id: str, src_height: int, src_width: int, fps: float) -> None:
        if self._clip is not None:
            raise FrameStoreError(
                f"{self.prefix}: begin_clip({clip_id!r}) while {self._clip['clip_id']!r} is open"
            )
        if clip_id in self._clip_ids:
            raise FrameStoreError(f"{self.prefix}: clip {clip_id!r} written twice")
        self._clip = dict(
            clip_id=clip_id,
            src_height=int(src_height),
            src_width=int(src_width),
            fps=float(fps),
            start=self._fh.tell(),
        )
        self._clip_rows = []

    def add_frames(self, frames_rgb: Iterable[np.ndarray]) -> None:
        if self._clip is None:
            raise FrameStoreError(f"{self.prefix}: add_frames() outside begin_clip()/end_clip()")
        for frame in frames_rgb:
            data = encode_jpeg(frame, self.quality)
            offset = self._fh.tell()
            self._fh.write(data)
            c = self._clip
            self._clip_rows.append(
                (
                    c["clip_id"],
                    len(self._clip_rows),
                    offset,
                    len(data),
                    frame.shape[0],
                    frame.shape[1],
                    c["src_height"],
                    c["src_width"],
                    c["fps"],
                )
            )

    def end_clip(self) -> int:
        """Keep the open clip; returns its number of frames."""
        if self._clip is None:
            raise FrameStoreError(f"{self.prefix}: end_clip() without begin_clip()")
        self._rows.extend(self._clip_rows)
        self._clip_ids.add(self._clip["clip_id"])
        n = len(self._clip_rows)
        self._clip, self._clip_rows = None, []
        return n

    def abort_clip(self) -> None:
        """Drop the open clip and the bytes it wrote."""
        if self._clip is None:
            return
        self._fh.seek(self._clip["start"])
        self._fh.truncate()
        self._clip, self._clip_rows = None, []

    # -- store level ------------------------------------------------------------------------
    def close(self) -> None:
        """Flush, fsync and rename both files into place (index last)."""
        if self._clip is not None:
            self.abort_clip()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        index = pd.DataFrame(self._rows, columns=INDEX_COLUMNS)
        index.to_csv(self._tmp_index, index=False)
        os.replace(self._tmp_pack, self._pack)
        os.replace(self._tmp_index, self._index)

    def discard(self) -> None:
        """Remove the temporary files; nothing becomes visible."""
        if not self._fh.closed:
            self._fh.close()
        for tmp in (self._tmp_pack, self._tmp_index):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> FrameStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def read_index(prefix: str | os.PathLike) -> pd.DataFrame:
    """Load and check ``<prefix>.index.csv`` (columns, integer types, offsets inside the pack)."""
    path = index_path(prefix)
    if not path.exists():
        raise FrameStoreError(f"frame store index not found: {path}")
    try:
        index = pd.read_csv(path, dtype={"clip_id": str})
    except pd.errors.EmptyDataError as err:
        raise FrameStoreError(f"{path}: empty file (not even a header)") from err
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise FrameStoreError(f"{path}: missing columns {missing}")
    for col in _INT_COLUMNS:
        if len(index) and (
            index[col].isna().any() or not pd.api.types.is_integer_dtype(index[col])
        ):
            raise FrameStoreError(f"{path}: column {col!r} must be integers")
        index[col] = index[col].astype("int64")  # an empty index reads as object columns
    index["fps"] = index["fps"].astype(float)
    pack = pack_path(prefix)
    if not pack.exists():
        raise FrameStoreError(f"frame store pack not found: {pack}")
    end = int((index["offset"] + index["nbytes"]).max()) if len(index) else 0
    if end > pack.stat().st_size:
        raise FrameStoreError(
            f"{pack}: index points past the end of the pack ({end} > {pack.stat().st_size} bytes)"
        )
    return index


class DecodedFrameCache:
    """Decoded frames kept in memory, least recently used first out, up to ``budget_mb``.

    Training decodes the same JPEGs every epoch (the demo's fine-tuning spent 11 % of its time
    in ``cv2.imdecode``); one cache can serve several :class:`FrameStore` s (keys hold the
    store's prefix). ``budget_mb`` 0 keeps nothing. The arrays it returns are read-only: a
    reader copies them into its own output.
    """

    def __init__(self, budget_mb: float):
        if budget_mb < 0:
            raise ValueError(f"frame cache budget must be >= 0 MiB, got {budget_mb}")
        self.budget = int(float(budget_mb) * 2**20)
        self.used = 0
        self._frames: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, str, int]) -> np.ndarray | None:
        frame = self._frames.get(key)
        if frame is not None:
            self._frames.move_to_end(key)
        return frame

    def put(self, key: tuple[str, str, int], frame: np.ndarray) -> None:
        if frame.nbytes > self.budget or key in self._frames:
            return
        frame.flags.writeable = False
        self._frames[key] = frame
        self.used += frame.nbytes
        while self.used > self.budget:
            _, old = self._frames.popitem(last=False)
            self.used -= old.nbytes

    def __len__(self) -> int:
        return len(self._frames)

    def __getstate__(self) -> dict:
        # A DataLoader worker gets the budget, not the frames: each worker fills its own.
        return {**self.__dict__, "used": 0, "_frames": OrderedDict()}


class FrameStore:
    """Read frames of one shard: ``FrameStore(prefix).read(clip_id, indices)``.

    The index is loaded at construction; the pack is memory-mapped on first read. Pickling
    drops the memory map (each DataLoader worker reopens it lazily), so sending a FrameStore
    to workers costs only the small index. ``cache``: a :class:`DecodedFrameCache` that
    ``read`` looks in before decoding and fills after (None: decode every time).
    """

    def __init__(self, prefix: str | os.PathLike, cache: DecodedFrameCache | None = None):
        self.prefix = str(prefix)
        self.cache = cache
        index = read_index(prefix)
        self._clips: dict[str, dict] = {}
        for clip_id, rows in index.groupby("clip_id", sort=False):
            rows = rows.sort_values("frame")
            first = rows.iloc[0]
            self._clips[str(clip_id)] = dict(
                offsets=rows["offset"].to_numpy(np.int64),
                nbytes=rows["nbytes"].to_numpy(np.int64),
                meta=dict(
                    height=int(first["height"]),
                    width=int(first["width"]),
                    src_height=int(first["src_height"]),
                    src_width=int(first["src_width"]),
                    fps=float(first["fps"]),
                    n_frames=len(rows),
                ),
            )
        self._mm: np.ndarray | None = None

    @property
    def clip_ids(self) -> list[str]:
        """Clip ids in storage order."""
        return list(self._clips)

    def __len__(self) -> int:
        return len(self._clips)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._clips

    def _clip(self, clip_id: str) -> dict:
        try:
            return self._clips[clip_id]
        except KeyError:
            raise KeyError(
                f"clip {clip_id!r} is not in frame store {self.prefix} "
                f"({len(self._clips)} clips; failed clips are left out, see its status.csv)"
            ) from None

    def num_frames(self, clip_id: str) -> int:
        return self._clip(clip_id)["meta"]["n_frames"]

    def meta(self, clip_id: str) -> dict:
        """``height, width`` (stored), ``src_height, src_width`` (original), ``fps``,
        ``n_frames``."""
        return dict(self._clip(clip_id)["meta"])

    def _pack(self) -> np.ndarray:
        if self._mm is None:
            path = pack_path(self.prefix)
            # np.memmap refuses empty files; an all-failed shard has an empty pack
            self._mm = (
                np.memmap(path, dtype=np.uint8, mode="r")
                if path.stat().st_size
                else np.zeros(0, np.uint8)
            )
        return self._mm

    def read(self, clip_id: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 ``(T, H, W, 3)`` of the asked frames (all when ``indices`` is None).

        Only the asked JPEGs are decoded. Negative indices count from the end, as in numpy.
        """
        clip = self._clip(clip_id)
        n = clip["meta"]["n_frames"]
        if indices is None:
            idx = np.arange(n)
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = idx[(idx >= n) | (idx < -n)]
            if bad.size:
                raise IndexError(
                    f"{self.prefix}: clip {clip_id!r} has {n} frames, asked frame {int(bad[0])}"
                )
            idx = idx % n
        pack = self._pack()
        meta = clip["meta"]
        out = np.empty((len(idx), meta["height"], meta["width"], 3), np.uint8)
        for k, i in enumerate(idx):
            key = (self.prefix, clip_id, int(i))
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                out[k] = cached
                continue
            off, nb = clip["offsets"][i], clip["nbytes"][i]
            try:
                out[k] = decode_jpeg(pack[off : off + nb])
            except ValueError as err:
                raise FrameStoreError(
                    f"{self.prefix}: clip {clip_id!r} frame {int(i)} is not a valid JPEG"
                ) from err
            if self.cache is not None:
                self.cache.put(key, out[k].copy())
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"] = None  # reopened lazily in the worker
        return state
