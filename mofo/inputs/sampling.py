"""Which frames of a clip go into the model (VideoMAE-style temporal sampling).

Two schemes, both returning ``num_frames`` sorted frame indices into a clip of ``n_frames``:

``dense``
    A window of ``num_frames`` frames ``sampling_rate`` apart (VideoMAE pretraining, and its
    Kinetics fine-tuning). Training picks the window start at random; testing places
    ``num_clips`` windows evenly from the first to the last possible start.
``segment``
    The clip is split into ``num_frames`` equal segments and one frame is taken from each
    (TSN / VideoMAE's SSV2 fine-tuning): a random frame per segment in training, a fixed
    position per segment at test (the middle for one test clip; ``num_clips`` evenly spread
    positions otherwise). It always covers the whole clip, which suits short, whole-action
    clips such as SSV2, EPIC-KITCHENS segments and the demo.

Short-clip fallback (documented; the decode stage marks such clips ``short``): when a clip
has fewer frames than a dense window spans, the window is squeezed over the whole clip, i.e.
``num_frames`` evenly spaced indices from the first to the last frame; when the clip has
fewer than ``num_frames`` frames this repeats frames. Segment sampling needs no fallback:
with fewer frames than segments, neighbouring segments share a frame.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("dense", "segment")


def _check(n_frames: int, num_frames: int, sampling_rate: int = 1) -> None:
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got n_frames={n_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if sampling_rate < 1:
        raise ValueError(f"sampling_rate must be >= 1, got {sampling_rate}")


def window_span(num_frames: int, sampling_rate: int) -> int:
    """Frames covered by a dense window: first to last sampled frame, inclusive."""
    return (num_frames - 1) * sampling_rate + 1


def squeezed_indices(n_frames: int, num_frames: int) -> np.ndarray:
    """The short-clip fallback: ``num_frames`` evenly spaced indices over the whole clip."""
    _check(n_frames, num_frames)
    return np.round(np.linspace(0, n_frames - 1, num_frames)).astype(np.int64)


def _window(start: int, num_frames: int, sampling_rate: int) -> np.ndarray:
    return start + np.arange(num_frames, dtype=np.int64) * sampling_rate


def sample_clip_indices(
    n_frames: int,
    num_frames: int,
    sampling_rate: int,
    rng: np.random.Generator | None = None,
    mode: str = "train",
) -> np.ndarray:
    """Dense sampling: one window of ``num_frames`` frames, ``sampling_rate`` apart.

    ``mode="train"`` draws the start uniformly from every start that fits (needs ``rng``);
    ``mode="test"`` takes the centred window. Clips shorter than the window use
    :func:`squeezed_indices`.
    """
    _check(n_frames, num_frames, sampling_rate)
    span = window_span(num_frames, sampling_rate)
    if n_frames < span:
        return squeezed_indices(n_frames, num_frames)
    slack = n_frames - span
    if mode == "train":
        if rng is None:
            raise ValueError("sample_clip_indices(mode='train') needs an rng")
        start = int(rng.integers(0, slack + 1))
    elif mode == "test":
        start = slack // 2
    else:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    return _window(start, num_frames, sampling_rate)


def segment_indices(
    n_frames: int,
    num_frames: int,
    rng: np.random.Generator | None = None,
    mode: str = "train",
    position: float = 0.5,
) -> np.ndarray:
    """Segment sampling: one frame from each of ``num_frames`` equal segments.

    Segment ``i`` covers the real interval ``[i·L, (i+1)·L)`` with ``L = n_frames/num_frames``.
    ``mode="train"``: a uniformly random frame of each segment (independently per segment,
    needs ``rng``). ``mode="test"``: the frame at ``position`` (0 = start, 0.5 = middle) of
    each segment.
    """
    _check(n_frames, num_frames)
    length = n_frames / num_frames
    starts = np.arange(num_frames, dtype=np.float64) * length
    if mode == "train":
        if rng is None:
            raise ValueError("segment_indices(mode='train') needs an rng")
        points = starts + rng.random(num_frames) * length
    elif mode == "test":
        if not 0.0 <= position < 1.0:
            raise ValueError(f"position must be in [0, 1), got {position}")
        points = starts + position * length
    else:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    return np.clip(np.floor(points), 0, n_frames - 1).astype(np.int64)


def test_views(
    n_frames: int,
    num_frames: int,
    sampling_rate: int,
    num_clips: int,
    scheme: str = "dense",
) -> np.ndarray:
    """Indices of ``num_clips`` evenly spaced temporal views, shape ``(num_clips, num_frames)``.

    ``dense``: windows whose starts are spread evenly from 0 to ``n_frames - span``
    (one clip: the centred window). ``segment``: view ``k`` takes position
    ``(k + 0.5) / num_clips`` inside every segment (one clip: the middle frames).
    """
    _check(n_frames, num_frames, sampling_rate)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if scheme == "segment":
        return np.stack(
            [
                segment_indices(n_frames, num_frames, mode="test", position=(k + 0.5) / num_clips)
                for k in range(num_clips)
            ]
        )
    if scheme != "dense":
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    span = window_span(num_frames, sampling_rate)
    if n_frames < span:
        return np.stack([squeezed_indices(n_frames, num_frames)] * num_clips)
    slack = n_frames - span
    if num_clips == 1:
        starts = [slack // 2]
    else:
        starts = np.round(np.linspace(0, slack, num_clips)).astype(np.int64).tolist()
    return np.stack([_window(int(s), num_frames, sampling_rate) for s in starts])


def train_indices(
    n_frames: int,
    num_frames: int,
    sampling_rate: int,
    rng: np.random.Generator,
    scheme: str,
) -> np.ndarray:
    """Training-time indices for ``scheme`` ("dense" or "segment")."""
    if scheme == "dense":
        return sample_clip_indices(n_frames, num_frames, sampling_rate, rng, mode="train")
    if scheme == "segment":
        return segment_indices(n_frames, num_frames, rng, mode="train")
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


# The name is part of the public API; keep pytest from collecting it when a test imports it.
test_views.__test__ = False  # type: ignore[attr-defined]
