"""The training / evaluation dataset: decoded frames + motion boxes -> model-ready clips.

One item of :class:`VideoClipDataset` is a dict (collated by PyTorch's default collate):

==============  ==========================  =================================================
key             type                        meaning
==============  ==========================  =================================================
frames          uint8 ``(3, T, S, S)``      RGB clip (``S = model.input_size``), normalised on the
                                            device by ``mofo.runtime.device.to_device``; float32
                                            ImageNet-normalised with ``engine.uint8_frames: false``
                                            or in fine-tuning with random erasing
boxes           float32 ``(T, 4)``          motion box per sampled frame, crop pixels
                                            ``x1, y1, x2, y2`` (exclusive); empty = all zero
inbox           bool ``(N,)``               tokens overlapping the box (masking.grid)
mask            bool ``(N,)``               pretrain only: True = masked (``masking.*``); absent
                                            for a model-side strategy (``everest``)
trajectories    float32 ``(N, P, L, 2)``    pretrain with ``pretrain.target: mme`` only: the
                                            trajectories (model-input px) of the ``P`` cells
                                            of each token, from its tubelet's first frame
                                            (:func:`mofo.formats.trajfile.token_trajectories`)
trajectory_valid bool ``(N, P, L)``         which of those steps are valid
token_flow      float32 ``(T-1, h, w, 2)``  with ``token_flow=True`` only (pretrain, test):
                                            the flow between the sampled frames at the
                                            crop's token grid, in cells (``tokenflow``)
label           int64 ``()``                class (-1 = unknown); EPIC-100: the verb class
verb, noun      int64 ``()``                EPIC-100 only (the ``action`` classifier's target is
                                            looked up from them in fine-tuning)
frame_indices   int64 ``(T,)``              which stored frames were sampled
clip_id         str
index           int                         position of the clip in the dataset's clip list
view            int                         test only: ``clip_idx * num_crops + crop_idx``
==============  ==========================  =================================================

Modes: ``pretrain`` (dense random window, VideoMAE multi-scale crop, no flip, mask),
``finetune`` (segment/dense random sampling, random resized crop, flip where the dataset
allows it, RandAugment, random erasing) and ``test`` (deterministic views: ``test_clips``
temporal views x ``test_crops`` spatial crops after resizing the short side to ``S``).

Per-sample randomness: ``numpy.random.default_rng([seed, epoch, item])``, so a run is
reproducible for any number of workers. The epoch lives in shared memory, so
:meth:`VideoClipDataset.set_epoch` reaches persistent workers too (call it before iterating
the loader for that epoch; :func:`mofo.runtime.loader.set_loader_epoch` does it with the
sampler's).

``with_boxes=False`` reads no box files (a stage that pools all tokens, e.g. the features
stage, needs none, so it runs on decoded frames alone): every frame's box is then the whole
frame and every token is in-box.

Frame stores, box files and trajectory files are opened lazily and cached per worker process, one per shard;
only the sampled frames are decoded. A masking strategy that follows the flow
(``mofo.masking.FLOW_STRATEGIES``: ``mgmae``) also reads the clip's pooled flow
(``flow/shard-XXXX.pooled.npz``, :mod:`mofo.formats.tokenflow`), cropped with the clip's own
pretraining crop and sampled at the token grid; a clip the flow job left out (its flow
failed) moves nothing, with a warning. Clips that are not in their shard's frame store (decode
failed) are skipped when the dataset is built, counted in ``n_skipped`` and logged once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mofo.data.manifest import shard_name
from mofo.formats.boxfile import BoxFileError, read_boxes
from mofo.formats.framestore import DecodedFrameCache, FrameStore
from mofo.formats.tokenflow import clip_token_flow, pooled_flow_path
from mofo.formats.trajfile import TrajectoryFile, TrajectoryFileError, token_trajectories
from mofo.inputs import sampling, transforms
from mofo.masking import mask_from_config, needs_token_flow
from mofo.masking.grid import inbox_tokens, token_grid
from mofo.paths import pattern

log = logging.getLogger(__name__)

MODES = ("pretrain", "finetune", "test")


class DatasetError(RuntimeError):
    """The frames or boxes a clip needs are missing or inconsistent; the message names the file."""


# --------------------------------------------------------------------------- config rules


def flip_allowed(config: dict) -> bool:
    """Whether fine-tuning may flip clips left/right: never for demo and ssv2 (left/right is
    part of the class), ``dataset.<name>.horizontal_flip`` for list files and epic100."""
    name = config["dataset"]["name"]
    if name in ("demo", "ssv2"):
        return False
    if name in ("list", "epic100"):
        return bool(config["dataset"][name]["horizontal_flip"])
    raise ValueError(f"unknown dataset.name {name!r}")


def sampling_scheme(config: dict, mode: str) -> str:
    """Temporal sampling scheme for ``mode``: ``augment.pretrain_sampling`` for pretraining,
    ``augment.finetune_sampling`` otherwise ("auto": dense for list files, which are
    Kinetics/UCF-style untrimmed-ish clips, segment for demo, ssv2 and epic100)."""
    aug = config["augment"]
    if mode == "pretrain":
        return aug["pretrain_sampling"]
    scheme = aug["finetune_sampling"]
    if scheme == "auto":
        return "dense" if config["dataset"]["name"] == "list" else "segment"
    return scheme


def build_test_views(dataset_len: int, num_clips: int, num_crops: int) -> np.ndarray:
    """All test views, int64 ``(dataset_len * num_clips * num_crops, 3)`` rows of
    ``(index, clip_idx, crop_idx)``, clip-major (the views of one clip are adjacent)."""
    if num_clips < 1 or num_crops < 1:
        raise ValueError(f"num_clips and num_crops must be >= 1, got {num_clips}, {num_crops}")
    index, clip_idx, crop_idx = np.meshgrid(
        np.arange(dataset_len), np.arange(num_clips), np.arange(num_crops), indexing="ij"
    )
    return np.stack([index.ravel(), clip_idx.ravel(), crop_idx.ravel()], axis=1).astype(np.int64)


# --------------------------------------------------------------------------- dataset


class VideoClipDataset(Dataset):
    """Clips of one split of the manifest, sampled and augmented for ``mode``.

    Args:
        manifest: the manifest table (``mofo.data.manifest.read_manifest``).
        results_dir: ``<results_dir>/<dataset>``; frames, boxes, trajectories and pooled
            flow where ``mofo.paths.LAYOUT`` puts them (``frames/shard-XXXX``,
            ``boxes/shard-XXXX.csv``, ...).
        split: which ``split`` rows to use (``train``, ``validation``, ``test``).
        mode: ``pretrain`` | ``finetune`` | ``test``.
        config: the full mofo config (``model``, ``masking``, ``augment``, ``dataset``).
        test_view: test only: ``(clip_idx, crop_idx)`` to yield that single view per clip;
            None enumerates every view (``num_clips * num_crops`` items per clip).
        seed: base seed of the per-sample generators.
        num_clips, num_crops: test views; default ``augment.test_clips`` / ``test_crops``.
        with_boxes: False = read no box files; boxes are the whole frame (see the module doc).
        token_flow: add each sample's flow at the token grid (``token_flow``; pretraining and
            test modes, whose crops are plain rectangles), e.g. to draw an ``mgmae`` mask
            outside the loader. Pretraining with ``mgmae`` reads it for the mask either way.
        frame_cache_mb: decoded frames kept in memory across epochs, per loader process
            (:class:`mofo.formats.framestore.DecodedFrameCache`; 0 = decode every read). The
            samples are the same either way.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        results_dir: str | Path,
        split: str,
        mode: str,
        config: dict,
        test_view: tuple[int, int] | None = None,
        *,
        seed: int = 0,
        num_clips: int | None = None,
        num_crops: int | None = None,
        with_boxes: bool = True,
        token_flow: bool = False,
        frame_cache_mb: float = 0.0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if token_flow and mode == "finetune":
            raise ValueError("token_flow is only available in modes 'pretrain' and 'test' (the "
                             "fine-tuning crops are not rectangles of the stored frame)")
        self.with_token_flow = bool(token_flow)
        self.results_dir = Path(results_dir)
        self.split, self.mode, self.seed = split, mode, int(seed)
        self.with_boxes = bool(with_boxes)
        self.model_cfg = dict(config["model"])
        self.masking_cfg = dict(config["masking"])
        self.augment_cfg = dict(config["augment"])
        self.uint8_frames = bool(config["engine"]["uint8_frames"])
        self.dataset_name = config["dataset"]["name"]
        self.scheme = sampling_scheme(config, mode)
        self.flip = mode == "finetune" and flip_allowed(config)
        self.grid = token_grid(self.model_cfg)
        # MME's trajectory targets: only pretraining with pretrain.target mme reads them.
        mme = mode == "pretrain" and config["pretrain"]["target"] == "mme"
        self.mme_cell = int(config["pretrain"]["mme"]["cell"]) if mme else None
        self.reads_flow = token_flow or (
            mode == "pretrain" and needs_token_flow(self.masking_cfg["strategy"]))
        rand_augment = self.augment_cfg["rand_augment"]
        self.rand_augment = (
            transforms.VideoRandAugment(rand_augment, int(self.model_cfg["input_size"]))
            if mode == "finetune" and rand_augment
            else None
        )
        self.num_clips = int(num_clips or self.augment_cfg["test_clips"])
        self.num_crops = int(num_crops or self.augment_cfg["test_crops"])

        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        if rows.empty:
            raise DatasetError(f"no manifest rows with split {split!r} (splits: {sorted(manifest['split'].unique())})")
        self.clips, self.skipped_ids = self._available_clips(rows)
        self.n_skipped = len(self.skipped_ids)
        if self.n_skipped:
            log.warning(
                "%s/%s: skipped %d of %d clips that are not in the frame store (decode failed; "
                "see frames/shard-XXXX.status.csv), e.g. %s",
                self.results_dir, split, self.n_skipped, len(rows), self.skipped_ids[:3],
            )
        if self.clips.empty:
            raise DatasetError(f"{self.results_dir}: no decoded clips in split {split!r}")
        span = int(self.model_cfg["num_frames"]) * int(self.model_cfg["sampling_rate"])
        n_short = int((self.clips["n_frames"] < span).sum())
        if n_short:
            log.warning("%s/%s: %d of %d clips have fewer than the model's %d-frame span; "
                        "their frames are spread over the clip and repeated "
                        "(mofo/inputs/sampling.py)",
                        self.results_dir, split, n_short, len(self.clips), span)

        if mode == "test":
            if test_view is None:
                self.views = build_test_views(len(self.clips), self.num_clips, self.num_crops)
            else:
                clip_idx, crop_idx = (int(v) for v in test_view)
                if not (0 <= clip_idx < self.num_clips and 0 <= crop_idx < self.num_crops):
                    raise ValueError(f"test_view {test_view} outside {self.num_clips} clips x {self.num_crops} crops")
                self.views = build_test_views(len(self.clips), 1, 1)
                self.views[:, 1:] = (clip_idx, crop_idx)
        elif test_view is not None:
            raise ValueError("test_view is only meaningful in mode 'test'")
        else:
            self.views = None

        # The epoch is read by the workers: shared memory reaches persistent workers.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._stores: dict[int, FrameStore] = {}
        self._frame_cache = DecodedFrameCache(frame_cache_mb)  # shared by the shards' stores
        self._boxes: dict[int, dict[str, np.ndarray]] = {}
        self._trajectories: dict[int, TrajectoryFile] = {}
        self._pooled: dict[int, Any] = {}  # shard -> open npz of the pooled flow
        self._warned_no_flow: set[str] = set()

    # -- construction helpers ------------------------------------------------------------

    def frames_prefix(self, shard: int) -> Path:
        return Path(pattern("frames", self.results_dir, shard=shard_name(shard)))

    def boxes_path(self, shard: int) -> Path:
        return Path(pattern("boxes", self.results_dir, shard=shard_name(shard)))

    def trajectories_path(self, shard: int) -> Path:
        return Path(pattern("trajectories", self.results_dir, shard=shard_name(shard)))

    def _available_clips(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        """Rows whose clip is in its shard's store, with ``n_frames``; and the skipped ids."""
        keep, n_frames, skipped = [], [], []
        shards = rows.groupby("shard", sort=True)
        for shard, part in tqdm(shards, total=shards.ngroups, desc="frame stores", unit="shard", leave=False):
            store = FrameStore(self.frames_prefix(int(shard)))  # index only; dropped after
            for pos, clip_id in zip(part.index, part["clip_id"]):
                if clip_id in store:
                    keep.append(pos)
                    n_frames.append(store.num_frames(clip_id))
                else:
                    skipped.append(str(clip_id))
        clips = rows.loc[keep, ["clip_id", "shard", "label", "verb_class", "noun_class"]].copy()
        clips["n_frames"] = np.asarray(n_frames, dtype=np.int64)
        order = rows.index.get_indexer(clips.index)  # keep manifest order
        clips = clips.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)
        return clips, skipped

    # -- per-worker caches ----------------------------------------------------------------

    def _store(self, shard: int) -> FrameStore:
        if shard not in self._stores:
            self._stores[shard] = FrameStore(self.frames_prefix(shard), self._frame_cache)
        return self._stores[shard]

    def _clip_boxes(self, shard: int, clip_id: str) -> np.ndarray:
        if shard not in self._boxes:
            try:
                self._boxes[shard] = read_boxes(self.boxes_path(shard))
            except BoxFileError as err:
                raise DatasetError(str(err)) from err
        try:
            return self._boxes[shard][clip_id]
        except KeyError:
            raise DatasetError(f"{self.boxes_path(shard)}: no boxes for clip {clip_id!r}") from None

    def _trajectory_targets(self, index: int, indices: np.ndarray, frame_hw: tuple[int, int],
                            crop: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
        """``trajectories`` / ``trajectory_valid`` of a pretraining sample (see the table)."""
        clip_id = str(self.clips.at[index, "clip_id"])
        shard = int(self.clips.at[index, "shard"])
        try:
            if shard not in self._trajectories:
                self._trajectories[shard] = TrajectoryFile(self.trajectories_path(shard))
            traj = self._trajectories[shard].clip(clip_id)
        except TrajectoryFileError as err:
            raise DatasetError(str(err)) from err
        m = self.model_cfg
        disp, valid = token_trajectories(
            traj, indices[:: int(m["tubelet_size"])], frame_hw, crop, int(m["input_size"]),
            int(m["patch_size"]), self.mme_cell)
        return {"trajectories": torch.from_numpy(disp), "trajectory_valid": torch.from_numpy(valid)}

    def _clip_pooled_flow(self, shard: int, clip_id: str, n_frames: int) -> np.ndarray:
        """The clip's pooled flow ``(n_frames-1, gh, gw, 2)``; zeros (and a warning, once per
        clip and worker) for a clip the flow job left out."""
        if shard not in self._pooled:
            path = pooled_flow_path(self.results_dir, shard_name(shard))
            if not path.exists():
                raise DatasetError(
                    f"{path}: missing; masking {self.masking_cfg['strategy']!r} reads the pooled "
                    "flow the optical_flow rule writes (rerun it for this shard)")
            self._pooled[shard] = np.load(path)
        pooled = self._pooled[shard]
        if clip_id in pooled.files:
            return pooled[clip_id]
        if clip_id not in self._warned_no_flow:
            self._warned_no_flow.add(clip_id)
            log.warning("%s: no pooled flow for clip %s (its flow failed); it is masked as if "
                        "nothing moved", pooled_flow_path(self.results_dir, shard_name(shard)), clip_id)
        return np.zeros((max(n_frames - 1, 0), 1, 1, 2), dtype=np.float32)

    def token_flow(self, index: int, indices: np.ndarray, crop: tuple[float, float, float, float],
                   frame_size: tuple[int, int]) -> np.ndarray:
        """Flow between the sampled frames at the token grid of the crop ``(x0, y0, w, h)`` of
        the ``frame_size = (width, height)`` stored frames: float32 ``(T-1, h, w, 2)`` in token
        cells (``mofo.formats.tokenflow.clip_token_flow``)."""
        clip_id = str(self.clips.at[index, "clip_id"])
        shard = int(self.clips.at[index, "shard"])
        pooled = self._clip_pooled_flow(shard, clip_id, int(self.clips.at[index, "n_frames"]))
        m = self.model_cfg
        return clip_token_flow(pooled, indices, crop, frame_size, int(m["input_size"]), int(m["patch_size"]))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # each worker fills its own caches
        state["_stores"], state["_boxes"], state["_trajectories"], state["_pooled"] = {}, {}, {}, {}
        return state

    # -- epoch ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Seed the per-sample generators of this epoch (visible to running workers)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    # -- items ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.views) if self.views is not None else len(self.clips)

    def sample_rng(self, item: int) -> np.random.Generator:
        """The generator of item ``item`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(item)])

    def frame_indices(self, index: int, rng: np.random.Generator, clip_idx: int = 0) -> np.ndarray:
        """Stored-frame indices of clip ``index`` for this mode (test: temporal view ``clip_idx``)."""
        n = int(self.clips.at[index, "n_frames"])
        t, rate = int(self.model_cfg["num_frames"]), int(self.model_cfg["sampling_rate"])
        if self.mode == "test":
            return sampling.test_views(n, t, rate, self.num_clips, self.scheme)[clip_idx]
        return sampling.train_indices(n, t, rate, rng, self.scheme)

    def load(self, index: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frames uint8 ``(T, H, W, 3)`` and boxes float32 ``(T, 4)`` in stored-frame pixels."""
        clip_id = str(self.clips.at[index, "clip_id"])
        shard = int(self.clips.at[index, "shard"])
        store = self._store(shard)
        unique, inverse = np.unique(indices, return_inverse=True)  # decode each frame once
        frames = store.read(clip_id, unique)[inverse]
        meta = store.meta(clip_id)
        if not self.with_boxes:
            whole = np.array([0, 0, meta["width"], meta["height"]], dtype=np.float32)
            return frames, np.tile(whole, (len(indices), 1))
        src = self._clip_boxes(shard, clip_id)
        boxes = src[np.minimum(indices, len(src) - 1)].astype(np.float32)
        sx, sy = meta["width"] / meta["src_width"], meta["height"] / meta["src_height"]
        boxes *= np.array([sx, sy, sx, sy], dtype=np.float32)
        return frames, transforms.clip_boxes(boxes, meta["width"], meta["height"])

    def spatial(
        self, frames: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, crop_idx: int = 0
    ) -> tuple[torch.Tensor, np.ndarray, tuple[float, float, float, float] | None]:
        """Crop / resize / augment for this mode; returns the normalised clip, the crop boxes
        and (pretraining, test) the crop ``(x0, y0, w, h)`` in stored pixels that became the
        model's square (None for fine-tuning)."""
        size = int(self.model_cfg["input_size"])
        aug = self.augment_cfg
        crop = None
        if self.mode == "pretrain":  # transforms.multi_scale_crop, keeping the crop for the flow
            height, width = frames.shape[1:3]
            crop = transforms.multi_scale_crop_params(width, height, size, aug["multi_scale_crop"], rng)
            frames, boxes = transforms.crop_resize(frames, boxes, *crop, size, size)
        elif self.mode == "finetune":
            rrc = aug["random_resized_crop"]
            frames, boxes = transforms.random_resized_crop(frames, boxes, size, rng, rrc["scale"], rrc["ratio"])
            if self.flip and rng.random() < 0.5:
                frames, boxes = transforms.horizontal_flip(frames, boxes)
            if self.rand_augment is not None:
                frames, boxes = self.rand_augment(frames, boxes, rng)
        else:
            height, width = frames.shape[1:3]
            out_w, out_h = transforms.short_side_size(width, height, size)
            x0, y0 = transforms.spatial_crop_offset(out_w, out_h, size, crop_idx, self.num_crops)
            sx, sy = width / out_w, height / out_h  # the resize, undone
            crop = (x0 * sx, y0 * sy, size * sx, size * sy)
            frames, boxes = transforms.resize_short_side(frames, boxes, size)
            frames, boxes = transforms.spatial_crop(frames, boxes, size, crop_idx, self.num_crops)
        if self.mode == "finetune" and aug["random_erasing"] > 0:  # erases normalised pixels
            clip = transforms.normalize(frames)
            transforms.random_erase(clip, float(aug["random_erasing"]), rng)
        elif self.uint8_frames:  # normalised on the device (mofo.runtime.device.to_device)
            clip = transforms.clip_tensor(frames)
        else:
            clip = transforms.normalize(frames)
        return clip, boxes, crop

    def __getitem__(self, item: int) -> dict[str, Any]:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} outside dataset of {len(self)}")
        rng = self.sample_rng(item)
        if self.views is not None:
            index, clip_idx, crop_idx = (int(v) for v in self.views[item])
        else:
            index, clip_idx, crop_idx = item, 0, 0
        indices = self.frame_indices(index, rng, clip_idx)
        frames, boxes = self.load(index, indices)
        frame_hw = frames.shape[1:3]
        frame_size = (frames.shape[2], frames.shape[1])
        clip, boxes, crop = self.spatial(frames, boxes, rng, crop_idx)
        m = self.model_cfg
        inbox = inbox_tokens(
            boxes, int(m["num_frames"]), int(m["input_size"]), int(m["patch_size"]), int(m["tubelet_size"])
        )
        row = self.clips.iloc[index]
        sample: dict[str, Any] = {
            "frames": clip,
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "inbox": torch.from_numpy(inbox),
            "label": torch.tensor(int(row["label"]), dtype=torch.int64),
            "frame_indices": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
            "clip_id": str(row["clip_id"]),
            "index": index,
        }
        flow = self.token_flow(index, indices, crop, frame_size) if self.reads_flow else None
        if self.with_token_flow:
            sample["token_flow"] = torch.from_numpy(flow)
        if self.mode == "pretrain":  # None: a model-side strategy (everest) selects in the model
            mask = mask_from_config(self.masking_cfg, self.grid, inbox, rng, token_flow=flow)
            if mask is not None:
                sample["mask"] = torch.from_numpy(mask)
        if self.mme_cell is not None:
            sample.update(self._trajectory_targets(index, indices, frame_hw, crop))
        if self.dataset_name == "epic100":
            sample["verb"] = torch.tensor(int(row["verb_class"]), dtype=torch.int64)
            sample["noun"] = torch.tensor(int(row["noun_class"]), dtype=torch.int64)
        if self.mode == "test":
            sample["view"] = clip_idx * self.num_crops + crop_idx
        return sample
