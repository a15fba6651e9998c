"""A user's own videos through a list file, as docs/DATASETS.md "Your own videos" walks it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mofo.config import ConfigError, check_preset, load_config
from mofo.data.manifest import build_manifest
from tests.smkwork import run_snakemake
from tests.videofixtures import make_frames, write_video

ROOT = Path(__file__).resolve().parent.parent
LIST_YAML = ROOT / "config" / "list.yaml"


def snakemake(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Snakemake on the repository's Snakefile in a fresh working directory of its own
    (tests/smkwork.py: no ``.snakemake/`` shared with other tests)."""
    return run_snakemake(*args, timeout=timeout)


SIDE, Y0 = 30, 40  # make_frames(12, 120, 160): a 30-px square at y 40..70 ...


def square_x(t: int, speed: int) -> int:
    """... whose left edge is at this x in frame t (tests/videofixtures.make_frames)."""
    return (2 + t * speed) % (160 - SIDE)


def user_dataset(tmp_path: Path, n_clips: int = 4) -> tuple[Path, Path]:
    """Real mp4 files in sub-folders, a train and a validation list, and the overlay of an
    earlier project (another dataset's lists) that the user's overlay must override."""
    videos = tmp_path / "videos"
    lines = []
    for i in range(n_clips):
        path = videos / f"cls{i % 2}" / f"clip {i}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, make_frames(12, 120, 160, seed=i, speed=3 + i))
        lines.append(f"cls{i % 2}/clip {i}.mp4 {i % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    earlier = tmp_path / "earlier.yaml"
    earlier.write_text(yaml.safe_dump({"dataset": {"list": {"files": {
        "train": str(tmp_path / "nope-train.txt"), "validation": str(tmp_path / "nope-val.txt")}}}}))
    # Hand-drawn ground truth, keyframes only (every 3rd frame), as a user would draw it.
    gt = [(f"cls{i % 2}_clip_{i}", t, square_x(t, 3 + i), Y0, square_x(t, 3 + i) + SIDE, Y0 + SIDE)
          for i in range(n_clips) for t in range(0, 12, 3)]
    pd.DataFrame(gt, columns=["clip_id", "frame", "x1", "y1", "x2", "y2"]).to_csv(
        tmp_path / "gt.csv", index=False)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"),
        "tracking": {"mlflow": {"enabled": False}},
        "dataset": {"list": {"root": str(videos), "gt_boxes": str(tmp_path / "gt.csv"),
                             "files": {"train": str(tmp_path / "train.txt"), "validation": None}}},
    }))
    return earlier, mine


def test_an_overlay_replaces_and_drops_list_files(tmp_path: Path):
    earlier, mine = user_dataset(tmp_path)
    config = load_config([LIST_YAML, earlier, mine])
    assert config["dataset"]["list"]["files"] == {"train": str(tmp_path / "train.txt"),
                                                  "validation": None}
    manifest = build_manifest(config)
    assert set(manifest["split"]) == {"train"} and len(manifest) == 4
    # Clip ids: the path under the root without its suffix, '/' and spaces made '_'.
    assert manifest["clip_id"].tolist()[0] == "cls0_clip_0"
    assert manifest["shard"].nunique() == 2, "4 clips still make shards.min_shards = 2 shards"


def test_a_real_dataset_on_the_demo_preset_stops_with_the_overlay_to_add(tmp_path: Path):
    _, mine = user_dataset(tmp_path)
    config = load_config([mine], overrides={"dataset": {"name": "list"}})
    with pytest.raises(ConfigError, match="--configfile config/list.yaml"):
        check_preset(config)
    (tmp_path / "name.yaml").write_text("dataset: {name: list}\n")
    result = snakemake("-n", "motion", "--configfile", str(mine), str(tmp_path / "name.yaml"))
    assert result.returncode != 0
    assert "--configfile config/list.yaml your-overlay.yaml" in result.stdout + result.stderr


def test_a_split_name_outside_train_validation_test_stops_at_start_up(tmp_path: Path):
    _, mine = user_dataset(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset": {"list": {"files": {"all": "x.txt"}}}}))
    result = snakemake("-n", "motion", "--configfile", str(LIST_YAML), str(mine), str(bad))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "'all'" in out and "files" in out, out[-2000:]


@pytest.mark.slow
def test_motion_on_own_videos_with_the_real_data_defaults(tmp_path: Path):
    earlier, mine = user_dataset(tmp_path)
    result = snakemake("motion", "--cores", "2", "--configfile", str(LIST_YAML), str(earlier),
                       str(mine))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    res = tmp_path / "results" / "list"
    # The real-data defaults ran: frames decoded to a 256-px short side (the demo: 96), flow
    # and motion maps on the half-size grid (TV-L1 at scale 0.5; the demo: DIS at full size).
    frames = pd.read_csv(res / "frames" / "shard-0000.index.csv")
    assert set(frames["height"]) == {256}
    with np.load(res / "motion_map" / "shard-0000.npz") as maps:
        assert {maps[k].shape[1] for k in maps.files} == {128}
    quality = json.loads((res / "motion" / "box_quality.json").read_text())
    assert quality["n_clips"] == 4 and quality["n_clips_with_ground_truth"] == 4
    # The moving square is found: far better than a centre box (its path crosses the centre).
    assert quality["mean_iou"] > 0.4 and quality["mean_iou"] > quality["centre_box_mean_iou"] + 0.15
    assert quality["fallbacks"]["clips_detected"] == 4
    status = pd.concat(pd.read_csv(p) for p in sorted((res / "frames").glob("*.status.csv")))
    assert set(status["status"]) == {"ok"}, status  # 12 frames are not "short" for motion
    assert list((res / "motion" / "pictures" / "shard-0000").glob("*.png"))
