"""Low-level video helpers: write a clip with PyAV, read a frame range with decord, resize.

Reading uses ``decord.VideoReader.get_batch`` (frame-accurate random access, RGB output).
Writing uses PyAV (``av``): H.264 (``libx264``) for ``.mp4`` and VP9 (``libvpx-vp9``) for
``.webm``, both ``yuv420p`` so that every common decoder reads them.

Frame numbers here are 0-based and ranges are inclusive (``start_frame``/``stop_frame`` of the
manifest), ``-1`` meaning "whole video".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# PyAV must be loaded BEFORE decord: decord's wheel bundles an old libvpx whose symbols
# would otherwise be picked up by PyAV's libavcodec, and VP9 (.webm) encoding then fails
# with "avcodec_open2(libvpx-vp9) returned 22". Importing av first keeps both working.
import av  # import order matters, see above
import cv2
import numpy as np

# Codec per container suffix for write_video.
CODEC_BY_SUFFIX = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "libx264"}


class VideoReadError(RuntimeError):
    """A video cannot be opened or decoded; the message names the file and the problem."""


@dataclass(frozen=True)
class VideoInfo:
    """What decord reports about a video file."""

    path: str
    n_frames: int
    height: int
    width: int
    fps: float


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float = 12.0,
    codec: str | None = None,
    crf: int = 18,
) -> Path:
    """Encode RGB uint8 frames ``(T, H, W, 3)`` into ``path`` (yuv420p) and return the path.

    ``codec`` defaults from the suffix (``.mp4`` → libx264, ``.webm`` → libvpx-vp9). ``crf`` is
    the constant-quality setting (lower = better; 18 is visually lossless for x264). x264 runs
    single-threaded so that the same frames always give the same bytes (deterministic demo).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"{path}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    if frames.shape[0] == 0:
        raise ValueError(f"{path}: no frames to write")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p needs an even frame size, got {height}x{width}")
    codec = codec or CODEC_BY_SUFFIX.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"{path}: no default codec for suffix {path.suffix!r}; pass codec=")
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = _as_fraction(fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "threads": "1"}
        elif codec == "libvpx-vp9":
            stream.bit_rate = 0  # with crf: constant-quality mode
            stream.options = {
                "crf": str(crf),
                "threads": "1",
                "deadline": "realtime",
                "cpu-used": "8",
            }
        try:
            stream.codec_context.open()
        except av.error.FFmpegError as err:
            hint = (
                " (if decord was imported before PyAV: import av first, see mofo.data.video)"
                if codec == "libvpx-vp9"
                else ""
            )
            raise RuntimeError(f"{path}: cannot open encoder {codec}: {err}{hint}") from err
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _as_fraction(fps: float):
    """PyAV wants a rational frame rate; 29.97 → 2997/100 and so on."""
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def open_reader(path: str | os.PathLike, threads: int = 1):
    """Open ``path`` with decord; raise VideoReadError naming the file and the reason."""
    import decord

    path = str(path)
    if not os.path.exists(path):
        raise VideoReadError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: file is empty (0 bytes)")
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
    except Exception as err:  # decord raises DECORDError/RuntimeError with a vague text
        raise VideoReadError(f"{path}: cannot open video ({_probe_reason(path, err)})") from err


def _probe_reason(path: str, err: Exception) -> str:
    """A readable reason for a failed open: decord only says "Error reading", FFmpeg via PyAV
    says e.g. "moov atom not found" / "Invalid data found" / "no video stream"."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
            return f"decord: {str(err).strip().splitlines()[-1][:200]}"
    except Exception as probe_err:  # any FFmpeg error is the reason we want
        return f"{type(probe_err).__name__}: {probe_err}"


def probe(path: str | os.PathLike, threads: int = 1) -> VideoInfo:
    """Frame count, size and frame rate of a video (no frame is decoded)."""
    reader = open_reader(path, threads)
    return _info(str(path), reader)


def _info(path: str, reader) -> VideoInfo:
    n_frames = len(reader)
    if n_frames == 0:
        return VideoInfo(path, 0, 0, 0, float("nan"))
    height, width = reader[0].shape[:2]  # decodes one frame; decord has no size query
    reader.seek(0)
    fps = float(reader.get_avg_fps())
    return VideoInfo(path, n_frames, int(height), int(width), fps if fps > 0 else float("nan"))


def frame_indices(
    n_total: int, start_frame: int = -1, stop_frame: int = -1, max_frames: int = 0
) -> tuple[np.ndarray, str]:
    """The 0-based frame numbers to decode, and a note when the range had to be clipped.

    ``start_frame``/``stop_frame`` are inclusive, ``-1`` = from the first / to the last frame.
    A range running past the end of the video is clipped to the last frame (EPIC segments
    sometimes end one frame after the video does); a range starting after the end is an error.
    ``max_frames > 0`` subsamples the range evenly to at most that many frames.
    """
    if n_total <= 0:
        raise VideoReadError("video has zero frames")
    start = 0 if start_frame < 0 else int(start_frame)
    stop = n_total - 1 if stop_frame < 0 else int(stop_frame)
    note = ""
    if start >= n_total:
        raise VideoReadError(f"start_frame {start} is past the end of the video ({n_total} frames)")
    if stop < start:
        raise VideoReadError(f"stop_frame {stop} < start_frame {start}")
    if stop >= n_total:
        note = f"stop_frame {stop} clipped to the last frame {n_total - 1}"
        stop = n_total - 1
    idx = np.arange(start, stop + 1)
    if max_frames and len(idx) > max_frames:
        idx = np.unique(np.linspace(start, stop, max_frames).round().astype(np.int64))
    return idx, note


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(h, w)`` after scaling so the shorter side is ``short_side`` (aspect kept, rounded).

    ``short_side == 0`` keeps the size. The long side is rounded to the nearest pixel and at
    least 1.
    """
    if short_side <= 0 or min(height, width) == short_side:
        return height, width
    scale = short_side / min(height, width)
    if height <= width:
        return short_side, max(1, int(round(width * scale)))
    return max(1, int(round(height * scale))), short_side


def resize_frame(frame: np.ndarray, short_side: int) -> np.ndarray:
    """Resize one RGB frame so its short side is ``short_side``.

    INTER_AREA when shrinking (averages the source pixels, no aliasing), INTER_LINEAR when
    enlarging (INTER_AREA degrades to nearest-neighbour there).
    """
    height, width = frame.shape[:2]
    new_h, new_w = resized_size(height, width, short_side)
    if (new_h, new_w) == (height, width):
        return frame
    interp = cv2.INTER_AREA if new_h < height else cv2.INTER_LINEAR
    return cv2.resize(frame, (new_w, new_h), interpolation=interp)


def iter_frames(
    path: str | os.PathLike,
    start_frame: int = -1,
    stop_frame: int = -1,
    short_side: int = 0,
    max_frames: int = 0,
    chunk: int = 32,
    threads: int = 1,
) -> tuple[VideoInfo, np.ndarray, str, Iterator[np.ndarray]]:
    """Open a video and return ``(info, indices, note, chunks)``.

    ``chunks`` yields resized RGB uint8 arrays ``(t, h, w, 3)`` of at most ``chunk`` frames,
    covering ``indices`` in order; decoding in chunks keeps memory flat for long EPIC videos
    at full HD. decord does the work; where decord cannot (it fails on some frame widths,
    e.g. 48 px, with "DECORDArrayCopyFromTo: The size must exactly match", and on streams it
    cannot seek), the clip is decoded sequentially with PyAV instead. When both fail,
    VideoReadError names the file and both problems.
    """
    path = str(path)
    reader, info, decord_error = None, None, ""
    try:
        reader = open_reader(path, threads)
        info = _info(path, reader)
    except VideoReadError as err:
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            raise
        decord_error = str(err).removeprefix(f"{path}: ")
    except Exception as err:  # decord errors on broken headers / odd sizes
        decord_error = f"decord: {_short(err)}"
    if info is None:
        try:
            info = _pyav_info(path)
        except Exception as err:
            if decord_error.startswith("cannot open video"):  # already carries PyAV's reason
                raise VideoReadError(f"{path}: {decord_error}") from err
            raise VideoReadError(f"{path}: {decord_error}; PyAV: {_short(err)}") from err
        reader = None
    try:
        idx, note = frame_indices(info.n_frames, start_frame, stop_frame, max_frames)
    except VideoReadError as err:
        raise VideoReadError(f"{path}: {err}") from err

    def chunks() -> Iterator[np.ndarray]:
        done = 0
        if reader is not None:
            for lo in range(0, len(idx), chunk):
                part = idx[lo : lo + chunk]
                try:
                    batch = reader.get_batch(part.tolist()).asnumpy()
                except Exception as err:  # hand the rest to PyAV below
                    nonlocal decord_error
                    decord_error = f"decord, frames {int(part[0])}..{int(part[-1])}: {_short(err)}"
                    break
                if batch.shape[0] != len(part):
                    raise VideoReadError(f"{path}: asked {len(part)} frames, got {batch.shape[0]}")
                done += len(part)
                yield np.stack([resize_frame(f, short_side) for f in batch])
        if done < len(idx):
            try:
                yield from _pyav_chunks(path, idx[done:], short_side, chunk)
            except VideoReadError as err:
                raise VideoReadError(
                    f"{err}; before that {decord_error}" if decord_error else str(err)
                ) from err

    return info, idx, note, chunks()


def _pyav_info(path: str) -> VideoInfo:
    """Frame count (by demuxing packets: cheap, no decoding), size and fps with PyAV."""
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError("no video stream")
        stream = container.streams.video[0]
        n_frames = sum(1 for packet in container.demux(stream) if packet.size)
        fps = float(stream.average_rate) if stream.average_rate else float("nan")
        return VideoInfo(path, n_frames, int(stream.height), int(stream.width), fps)


def _pyav_chunks(path: str, idx: np.ndarray, short_side: int, chunk: int) -> Iterator[np.ndarray]:
    """Decode from the start with PyAV, keeping the frames whose number is in ``idx`` (sorted)."""
    wanted = iter(idx.tolist())
    target = next(wanted, None)
    batch: list[np.ndarray] = []
    got = 0
    try:
        with av.open(path) as container:
            for number, frame in enumerate(container.decode(video=0)):
                if target is None:
                    break
                if number != target:
                    continue
                batch.append(resize_frame(frame.to_ndarray(format="rgb24"), short_side))
                got += 1
                target = next(wanted, None)
                if len(batch) == chunk:
                    yield np.stack(batch)
                    batch = []
    except av.error.FFmpegError as err:
        raise VideoReadError(
            f"{path}: PyAV decoding failed after {got} of {len(idx)} frames ({_short(err)})"
        ) from err
    if target is not None:
        raise VideoReadError(f"{path}: video ended after {got} of {len(idx)} wanted frames")
    if batch:
        yield np.stack(batch)


def _short(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]
