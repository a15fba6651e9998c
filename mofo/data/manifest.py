"""The manifest: one table of every clip of the configured dataset (stage ``manifest``).

Columns and types are the contract of docs/ARCHITECTURE.md (``MANIFEST_COLUMNS``). The rows
come from the adapter of ``dataset.name`` (mofo.data.adapters), in annotation order (splits in
the configured order), and ``shard = row_index // shards.clips_per_shard``.

``count_clips``/``shard_names`` give the shard list without building the manifest (the
Snakefile needs it at parse time): for the demo from the config alone, for the real datasets
from the annotation files (no file-system checks on videos), with the same skipping rules as
``build_manifest``, so both always agree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mofo.data import adapters
from mofo.data import demo as demo_data
from mofo.paths import shard_index, shard_name  # the results layout names the shards

# The adapters' columns and dtypes plus the shard each clip is assigned to.
MANIFEST_DTYPES = {**adapters.ROW_DTYPES, "shard": "int64"}
MANIFEST_COLUMNS = list(MANIFEST_DTYPES)
SPLITS = ("train", "validation", "test")


class ManifestError(ValueError):
    """The manifest (or the rows that would make it) is invalid; the message names the file."""


def _adapter(config: dict):
    name = config["dataset"]["name"]
    try:
        return adapters.ADAPTERS[name]
    except KeyError:
        raise ManifestError(
            f"dataset.name {name!r}: no adapter (known: {sorted(adapters.ADAPTERS)})"
        ) from None


def build_manifest(config: dict) -> pd.DataFrame:
    """Manifest of ``config["dataset"]`` (missing videos: one warning, rows kept)."""
    rows = _adapter(config)(config["dataset"], check_videos=True)
    df = assign_shards(rows, clips_per_shard(config, len(rows)))
    validate_manifest(df, source=f"dataset {config['dataset']['name']!r}")
    if config["dataset"]["name"] == "demo":
        expected = demo_data.count_clips(config["dataset"]["demo"])
        if len(df) != expected:
            raise ManifestError(
                f"{Path(config['dataset']['demo']['root']) / 'clips.csv'} has {len(df)} clips "
                f"but the "
                f"config dataset.demo asks for {expected}: regenerate the demo data"
            )
    return df


def assign_shards(rows: pd.DataFrame, clips_per_shard: int) -> pd.DataFrame:
    """Add ``shard = row_index // clips_per_shard`` (rows keep their order)."""
    if clips_per_shard < 1:
        raise ManifestError(f"shards.clips_per_shard must be >= 1, got {clips_per_shard}")
    df = rows.reset_index(drop=True).copy()
    df["shard"] = (df.index // clips_per_shard).astype("int64")
    return df[MANIFEST_COLUMNS]


def count_clips(config: dict) -> int:
    """Number of manifest rows, cheaply: demo from the config, others from the annotations."""
    name = config["dataset"]["name"]
    if name == "demo":
        return demo_data.count_clips(config["dataset"]["demo"])
    return len(_adapter(config)(config["dataset"], check_videos=False))


def clips_per_shard(config: dict, n_clips: int) -> int:
    """``shards.clips_per_shard``, lowered for a small dataset so that it still makes
    ``shards.min_shards`` shards (shard jobs are what runs side by side)."""
    shards = config["shards"]
    per = int(shards["clips_per_shard"])
    return max(1, min(per, math.ceil(n_clips / int(shards["min_shards"]))))


def shard_names(config: dict) -> list[str]:
    """``["shard-0000", ...]``, one per :func:`clips_per_shard` clips."""
    n = count_clips(config)
    return [shard_name(i) for i in range(math.ceil(n / clips_per_shard(config, n)))]


def select_shard(manifest: pd.DataFrame, shard: str | int) -> pd.DataFrame:
    """The manifest rows of one shard (``"shard-0003"`` or 3); error if it has none."""
    idx = shard_index(shard)
    part = manifest[manifest["shard"] == idx]
    if part.empty:
        raise ManifestError(
            f"{shard_name(idx)}: no rows in the manifest (shards 0..{int(manifest['shard'].max())})"
        )
    return part.reset_index(drop=True)


def validate_manifest(df: pd.DataFrame, source: str = "manifest") -> pd.DataFrame:
    """Check columns, types and values; return the frame with the contract dtypes.

    ``source`` (a file name) starts every error message.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing columns {missing}")
    df = df[MANIFEST_COLUMNS].copy()
    for col, dtype in MANIFEST_DTYPES.items():
        if dtype == "int64":
            values = pd.to_numeric(df[col], errors="coerce")
            bad = values.isna() | (values != values.round())
            if bad.any():
                line = int(bad.to_numpy().nonzero()[0][0])
                raise ManifestError(
                    f"{source}: column {col!r} must be integers "
                    f"(row {line}: {df[col].iloc[line]!r})"
                )
            df[col] = values.astype("int64")
        elif dtype == "float64":
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        else:
            if df[col].isna().any() or (df[col].astype(str).str.strip() == "").any():
                raise ManifestError(f"{source}: empty value in column {col!r}")
            df[col] = df[col].astype(str)
    dup = df["clip_id"].duplicated()
    if dup.any():
        raise ManifestError(
            f"{source}: clip_id {df.loc[dup, 'clip_id'].iloc[0]!r} appears more than once"
        )
    unsafe = df["clip_id"] != df["clip_id"].map(adapters.safe_id)
    if unsafe.any():
        raise ManifestError(
            f"{source}: clip_id {df.loc[unsafe, 'clip_id'].iloc[0]!r} is not file-name safe"
        )
    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        raise ManifestError(
            f"{source}: split {df.loc[bad_split, 'split'].iloc[0]!r} is not one of {SPLITS}"
        )
    whole = (df["start_frame"] == -1) & (df["stop_frame"] == -1)
    ranged = (df["start_frame"] >= 0) & (df["stop_frame"] >= df["start_frame"])
    bad_range = ~(whole | ranged)
    if bad_range.any():
        r = df[bad_range].iloc[0]
        raise ManifestError(
            f"{source}: clip {r.clip_id!r} has a bad frame range {r.start_frame}..{r.stop_frame}"
        )
    if (df["label"] < -1).any():
        raise ManifestError(f"{source}: labels must be >= -1")
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and write ``manifest.csv`` atomically (temp file + rename)."""
    path = Path(path)
    df = validate_manifest(df, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a manifest; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    try:
        df = pd.read_csv(
            path, dtype={"clip_id": str, "video_path": str, "split": str}, keep_default_na=True
        )
    except pd.errors.EmptyDataError as err:
        raise ManifestError(f"{path}: empty file") from err
    return validate_manifest(df, source=str(path))


def label_subset(manifest: pd.DataFrame, fraction: float, seed: int,
                 split: str = "train") -> pd.DataFrame:
    """The labelled clips of ``split`` that a fine-tuning on ``fraction`` of the labels uses:
    per class (``label``; EPIC-KITCHENS-100: the verb class), ``max(1, round(fraction x n))``
    of its ``n`` clips, drawn without replacement by ``numpy.random.default_rng(seed)`` from the
    clips sorted by id, classes in increasing order -- the same subset for every variant of a
    seed, whatever the manifest's row order. Rows of other splits are never drawn. Returns the
    drawn rows (sorted by label, then clip id); ``fraction`` 1 = every labelled clip. A drawn
    clip that failed to decode is skipped when the clips load, as every stage skips it."""
    if not 0 < float(fraction) <= 1:
        raise ValueError(f"finetune.label_fraction must be in (0, 1], got {fraction!r}")
    rows = manifest[(manifest["split"] == split) & (manifest["label"] >= 0)]
    rows = rows.sort_values(["label", "clip_id"], kind="stable")
    if float(fraction) == 1.0:
        return rows.reset_index(drop=True)
    rng = np.random.default_rng(int(seed))
    drawn = []
    for _, group in rows.groupby("label", sort=True):
        keep = max(1, round(float(fraction) * len(group)))
        drawn.append(group.iloc[np.sort(rng.choice(len(group), size=keep, replace=False))])
    if not drawn:
        raise ValueError(f"finetune.label_fraction {fraction}: split {split!r} has no labelled clip")
    return pd.concat(drawn).reset_index(drop=True)
