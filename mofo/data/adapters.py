"""One adapter per dataset format: annotation files → manifest rows (a DataFrame).

Every adapter returns the manifest columns except ``shard`` (mofo.data.manifest adds it) and
takes ``check_videos``: when True, video files that do not exist are counted and reported in
ONE warning (they stay in the manifest; decode marks them ``failed``), so one missing file
never blocks a 200k-clip run. ``count_clips`` calls the adapters with ``check_videos=False``,
so the clip count (and thus the shard list) never depends on the file system state.

Bad annotations, per format (the manifest never silently contains garbage):

* ``demo``: ``clips.csv`` missing or with missing columns/values → error naming the file.
* ``ssv2``: a json file that is not a list of objects → error. Entries without ``id``/
  ``template`` or whose template is not in ``labels.json`` → skipped, counted, one warning
  naming the file and the first bad entries (index in the list).
* ``epic100``: missing columns → error. Rows with an empty/non-integer
  ``start_frame``/``stop_frame``/``verb_class``/``noun_class``, or ``stop_frame <
  start_frame`` → skipped, counted, one warning naming the file and the first bad rows
  (1-based line numbers of the CSV, header = line 1).
* ``list``: list files are small and written by hand, so any malformed line (no label,
  non-integer label, negative label) → error naming the file and the line number.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

#: The columns every adapter returns and their dtypes (the manifest adds ``shard``:
#: mofo.data.manifest.MANIFEST_DTYPES).
ROW_DTYPES = {
    "clip_id": str,
    "video_path": str,
    "label": "int64",
    "verb_class": "int64",
    "noun_class": "int64",
    "split": str,
    "start_frame": "int64",
    "stop_frame": "int64",
    "fps": "float64",
}
ROW_COLUMNS = list(ROW_DTYPES)

EPIC_COLUMNS = [
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
]
EPIC_REQUIRED = [
    "narration_id",
    "participant_id",
    "video_id",
    "start_frame",
    "stop_frame",
    "verb_class",
    "noun_class",
]
# The annotation file names (annotation_files lists them for the manifest rule).
DEMO_CLIPS_FILE = "clips.csv"
SSV2_LABELS_FILE = "labels.json"
EPIC_SPLIT_FILES = {"train": "EPIC_100_train.csv", "validation": "EPIC_100_validation.csv"}


def ssv2_split_file(split: str) -> str:
    return f"{split}.json"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class AnnotationError(ValueError):
    """An annotation file is missing or malformed; the message names the file (and line)."""


def safe_id(text: str) -> str:
    """File-name-safe clip id: runs of characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    out = _UNSAFE.sub("_", str(text)).strip("._")
    if not out:
        raise ValueError(f"cannot make a clip id out of {text!r}")
    return out


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    return df.astype(ROW_DTYPES)


def _whole_video_row(clip_id: str, video_path: str, label: int, split: str,
                     fps: float = float("nan")) -> dict:
    """A manifest row of a single-label format: no verb/noun classes, the whole video."""
    return {
        "clip_id": clip_id,
        "video_path": video_path,
        "label": label,
        "verb_class": -1,
        "noun_class": -1,
        "split": split,
        "start_frame": -1,
        "stop_frame": -1,
        "fps": fps,
    }


def _warn_skipped(path: Path | str, what: str, bad: list[str]) -> None:
    if bad:
        shown = "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped {len(bad)} {what}: {shown}", RuntimeWarning, stacklevel=3)


def _existing_files(paths: list[str]) -> set[str]:
    """The paths that exist. One directory listing per folder instead of one stat per file:
    SSV2 keeps 220k videos in one folder, and listing it once is far cheaper on a cluster
    file system than 220k stat calls."""
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        by_dir.setdefault(os.path.dirname(path) or ".", []).append(path)
    existing: set[str] = set()
    for folder, members in by_dir.items():
        if len(members) < 8:  # listing a big folder for a few files is the slower way
            existing.update(p for p in members if os.path.isfile(p))
            continue
        try:
            names = set(os.listdir(folder))
        except OSError:
            continue
        existing.update(p for p in members if os.path.basename(p) in names)
    return existing


def warn_missing_videos(df: pd.DataFrame, dataset: str) -> int:
    """Count manifest rows whose video file does not exist; one warning with examples."""
    paths = df["video_path"].drop_duplicates().tolist()
    existing = _existing_files(paths)
    missing = [p for p in paths if p not in existing]
    if missing:
        n_rows = int(df["video_path"].isin(missing).sum())
        warnings.warn(
            f"{dataset}: {len(missing)} video files are missing ({n_rows} clips); they stay in the "
            f"manifest and decode will mark them failed. First: {', '.join(missing[:3])}",
            RuntimeWarning,
            stacklevel=2,
        )
    return len(missing)


def _read_json(path: Path):
    if not path.exists():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: invalid JSON ({err})") from err


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
def demo_rows(dataset_cfg: dict, check_videos: bool = True) -> pd.DataFrame:
    """Rows from the generator's ``<root>/clips.csv`` (video paths are relative to root)."""
    root = Path(dataset_cfg["demo"]["root"])
    path = root / DEMO_CLIPS_FILE
    if not path.exists():
        raise AnnotationError(
            f"{path} not found: generate the demo data first (mofo.data.demo.generate)"
        )
    clips = pd.read_csv(path, dtype={"clip_id": str, "video_path": str, "split": str})
    needed = ["clip_id", "video_path", "label", "split", "fps"]
    missing = [c for c in needed if c not in clips.columns]
    if missing:
        raise AnnotationError(f"{path}: missing columns {missing}")
    if clips[needed].isna().any().any():
        bad = clips.index[clips[needed].isna().any(axis=1)][0]
        raise AnnotationError(f"{path}: empty value in line {bad + 2}")
    rows = [
        _whole_video_row(
            r.clip_id,
            str(root / r.video_path) if not os.path.isabs(r.video_path) else r.video_path,
            int(r.label),
            r.split,
            float(r.fps),
        )
        for r in clips.itertuples()
    ]
    df = _frame(rows)
    if check_videos:
        warn_missing_videos(df, "demo")
    return df


# --------------------------------------------------------------------------------------------
# Something-Something V2
# --------------------------------------------------------------------------------------------
def ssv2_template_key(template: str) -> str:
    """SSV2's ``template`` field marks placeholders as ``[something]``; labels.json keys are
    the same text without the brackets ("Putting [something] on [something]" →
    "Putting something on something")."""
    return template.replace("[", "").replace("]", "").strip()


def ssv2_rows(dataset_cfg: dict, check_videos: bool = True) -> pd.DataFrame:
    """Rows from ``labels.json`` + ``<split>.json``; videos ``<video_dir>/<id>.webm``."""
    cfg = dataset_cfg["ssv2"]
    root, video_dir = Path(cfg["root"]), Path(cfg["video_dir"])
    labels_path = root / SSV2_LABELS_FILE
    labels_raw = _read_json(labels_path)
    if not isinstance(labels_raw, dict):
        raise AnnotationError(f"{labels_path}: expected an object template -> class index")
    try:
        labels = {ssv2_template_key(k): int(v) for k, v in labels_raw.items()}
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{labels_path}: class indices must be integers ({err})") from err
    rows: list[dict] = []
    for split in cfg["splits"]:
        path = root / ssv2_split_file(split)
        entries = _read_json(path)
        if not isinstance(entries, list):
            raise AnnotationError(f"{path}: expected a list of objects")
        bad: list[str] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry or str(entry["id"]).strip() == "":
                bad.append(f"entry {i}: no id")
                continue
            vid = str(entry["id"]).strip()
            label = -1
            if split != "test":
                template = entry.get("template")
                if not isinstance(template, str):
                    bad.append(f"entry {i} (id {vid}): no template")
                    continue
                key = ssv2_template_key(template)
                if key not in labels:
                    bad.append(f"entry {i} (id {vid}): template {template!r} not in labels.json")
                    continue
                label = labels[key]
            rows.append(_whole_video_row(safe_id(vid), str(video_dir / f"{vid}.webm"), label, split))
        _warn_skipped(path, "entries", bad)
    df = _frame(rows)
    if check_videos:
        warn_missing_videos(df, "ssv2")
    return df


# --------------------------------------------------------------------------------------------
# EPIC-KITCHENS-100
# --------------------------------------------------------------------------------------------
def epic_video_path(video_dir: Path, participant_id: str, video_id: str) -> Path:
    """First existing of ``<dir>/<vid>.MP4``, ``<dir>/<P>/videos/<vid>.MP4``,
    ``<dir>/<P>/<vid>.MP4`` (the layouts of the download scripts); the first when none exists."""
    candidates = [
        video_dir / f"{video_id}.MP4",
        video_dir / participant_id / "videos" / f"{video_id}.MP4",
        video_dir / participant_id / f"{video_id}.MP4",
    ]
    for cand in candidates:
        if cand.exists():
            return cand
    return candidates[0]


def _epic_fps(annotations_dir: Path) -> dict[str, float]:
    """fps per video from ``EPIC_100_video_info.csv`` when present (50 or 60 fps videos)."""
    path = annotations_dir / "EPIC_100_video_info.csv"
    if not path.exists():
        return {}
    info = pd.read_csv(path)
    if not {"video_id", "fps"} <= set(info.columns):
        raise AnnotationError(f"{path}: expected columns video_id, fps")
    return dict(zip(info["video_id"].astype(str), info["fps"].astype(float), strict=True))


def _as_int(value) -> int | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return int(f) if np.isfinite(f) and f == int(f) else None


def epic100_rows(dataset_cfg: dict, check_videos: bool = True) -> pd.DataFrame:
    """One row per action segment; ``label = verb_class``.

    EPIC's ``start_frame``/``stop_frame`` are 1-based (they number the extracted
    ``frame_0000000001.jpg`` files) and inclusive; the manifest is 0-based inclusive, so both
    are shifted by -1.
    """
    cfg = dataset_cfg["epic100"]
    ann_dir, video_dir = Path(cfg["annotations_dir"]), Path(cfg["video_dir"])
    fps_by_video = _epic_fps(ann_dir)
    rows: list[dict] = []
    resolved: dict[tuple[str, str], str] = {}
    for split in cfg["splits"]:
        path = ann_dir / EPIC_SPLIT_FILES[split]
        if not path.exists():
            raise AnnotationError(f"annotation file not found: {path}")
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in EPIC_REQUIRED if c not in table.columns]
        if missing:
            raise AnnotationError(f"{path}: missing columns {missing}")
        bad: list[str] = []
        for i, r in enumerate(table[EPIC_REQUIRED].itertuples(index=False)):
            line = i + 2  # header is line 1
            nid, pid, vid = r.narration_id.strip(), r.participant_id.strip(), r.video_id.strip()
            start, stop = _as_int(r.start_frame), _as_int(r.stop_frame)
            verb, noun = _as_int(r.verb_class), _as_int(r.noun_class)
            if not nid or not vid or not pid:
                bad.append(f"line {line}: empty narration_id/participant_id/video_id")
            elif None in (start, stop, verb, noun):
                bad.append(
                    f"line {line} ({nid}): non-integer start_frame/stop_frame/verb_class/noun_class"
                )
            elif start < 1 or stop < start:
                bad.append(f"line {line} ({nid}): bad frame range {start}..{stop}")
            else:
                key = (pid, vid)
                if key not in resolved:
                    resolved[key] = str(epic_video_path(video_dir, pid, vid))
                rows.append(
                    dict(
                        clip_id=safe_id(nid),
                        video_path=resolved[key],
                        label=verb,
                        verb_class=verb,
                        noun_class=noun,
                        split=split,
                        start_frame=start - 1,
                        stop_frame=stop - 1,
                        fps=fps_by_video.get(vid, float("nan")),
                    )
                )
        _warn_skipped(path, "rows", bad)
    df = _frame(rows)
    if check_videos:
        warn_missing_videos(df, "epic100")
    return df


# --------------------------------------------------------------------------------------------
# VideoMAE-style list files
# --------------------------------------------------------------------------------------------
def list_rows(dataset_cfg: dict, check_videos: bool = True) -> pd.DataFrame:
    """Rows from ``path label`` lines (split on the LAST space, so paths may contain spaces).

    Relative paths are joined to ``dataset.list.root``. The clip id is the path relative to
    the root without its suffix, made file-name safe (``a/b c.mp4`` → ``a_b_c``); a repeated id
    gets ``__2``, ``__3``... appended.
    """
    cfg = dataset_cfg["list"]
    root = Path(cfg["root"] or ".")
    # A split set to null (or "") in an overlay is dropped: that is how an overlay removes a
    # split that a file merged before it declared.
    files = {split: f for split, f in cfg["files"].items() if f}
    if not files:
        raise AnnotationError(
            "dataset.list.files is empty: give {split: list file}, e.g. "
            "{train: my/train.txt, validation: my/val.txt} (splits: train, validation, test)"
        )
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for split, list_file in files.items():
        path = Path(list_file)
        if not path.exists():
            raise AnnotationError(f"list file not found: {path} (split {split})")
        with open(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.strip()
                if not line:
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) != 2:
                    raise AnnotationError(f"{path}:{lineno}: expected 'path label', got {line!r}")
                video, label_text = parts
                label = _as_int(label_text)
                if label is None or label < 0 or not label_text.lstrip("+").isdigit():
                    raise AnnotationError(
                        f"{path}:{lineno}: label {label_text!r} is not a non-negative integer"
                    )
                video_path = Path(video) if os.path.isabs(video) else root / video
                cid = safe_id(str(Path(video).with_suffix("")))
                seen[cid] = seen.get(cid, 0) + 1
                if seen[cid] > 1:
                    cid = f"{cid}__{seen[cid]}"
                rows.append(_whole_video_row(cid, str(video_path), label, split))
    df = _frame(rows)
    if check_videos:
        warn_missing_videos(df, "list")
    return df


ADAPTERS = {"demo": demo_rows, "ssv2": ssv2_rows, "epic100": epic100_rows, "list": list_rows}


def annotation_files(dataset_cfg: dict) -> list[str]:
    """The annotation files the adapter of ``dataset.name`` reads (the manifest rule's inputs,
    so a changed file rebuilds the manifest). A list split set to null is left out. EPIC's
    optional ``EPIC_100_video_info.csv`` (fps) is not listed: an input must exist."""
    name = dataset_cfg["name"]
    if name == "demo":
        return [f"{dataset_cfg['demo']['root']}/{DEMO_CLIPS_FILE}"]
    if name == "ssv2":
        cfg = dataset_cfg["ssv2"]
        root = cfg["root"]
        return [f"{root}/{SSV2_LABELS_FILE}"] + [
            f"{root}/{ssv2_split_file(split)}" for split in cfg["splits"]
        ]
    if name == "epic100":
        cfg = dataset_cfg["epic100"]
        return [f"{cfg['annotations_dir']}/{EPIC_SPLIT_FILES[split]}" for split in cfg["splits"]]
    if name == "list":
        return [f for f in dataset_cfg["list"]["files"].values() if f]
    raise AnnotationError(f"dataset.name {name!r}: no adapter (known: {sorted(ADAPTERS)})")
