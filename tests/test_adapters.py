"""Dataset adapters and the manifest: every format from tiny real fixtures, bad rows, IO."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Required packages, imported directly: a broken install must fail here, not skip.
import av  # noqa: F401  (before decord: see mofo.data.video)
import cv2  # noqa: F401
import decord  # noqa: F401
import numpy as np
import pandas as pd
import pytest

from mofo.config import ConfigError, load_config
from mofo.data import demo
from mofo.data.adapters import (
    EPIC_COLUMNS,
    AnnotationError,
    annotation_files,
    safe_id,
    ssv2_template_key,
)
from mofo.data.decode import decode_shard
from mofo.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    build_manifest,
    count_clips,
    read_manifest,
    select_shard,
    shard_index,
    shard_names,
    write_manifest,
)
from mofo.formats.framestore import FrameStore
from tests.videofixtures import write_video


def config(dataset: dict, clips_per_shard: int = 2) -> dict:
    return load_config(
        overrides={"dataset": dataset, "shards": {"clips_per_shard": clips_per_shard}}
    )


def numbered(n: int) -> np.ndarray:
    levels = 20 + 8 * np.arange(n)
    return np.broadcast_to(levels[:, None, None, None], (n, 32, 64, 3)).astype(np.uint8).copy()


# ---------------------------------------------------------------------------------- SSV2
@pytest.fixture
def ssv2(tmp_path):
    root, vids = tmp_path / "ssv2", tmp_path / "ssv2" / "videos"
    vids.mkdir(parents=True)
    (root / "labels.json").write_text(
        json.dumps(
            {"Putting something on something": "0", "Pushing something from left to right": "1"}
        )
    )
    train = [
        {
            "id": "11",
            "label": "putting a cup on a table",
            "template": "Putting [something] on [something]",
            "placeholders": ["a cup", "a table"],
        },
        {
            "id": "12",
            "label": "pushing a pen from left to right",
            "template": "Pushing [something] from left to right",
            "placeholders": ["a pen"],
        },
        {
            "id": "13",
            "label": "juggling",
            "template": "Juggling [something]",
            "placeholders": ["balls"],
        },
        {"label": "no id here", "template": "Putting [something] on [something]"},
    ]
    (root / "train.json").write_text(json.dumps(train))
    (root / "validation.json").write_text(
        json.dumps(
            [
                {
                    "id": "21",
                    "label": "x",
                    "placeholders": [],
                    "template": "Pushing [something] from left to right",
                }
            ]
        )
    )
    (root / "test.json").write_text(json.dumps([{"id": "31"}]))
    for vid in ("11", "12", "21"):
        write_video(vids / f"{vid}.webm", n_frames=6, height=32, width=64)
    return dict(
        name="ssv2",
        ssv2=dict(root=str(root), video_dir=str(vids), splits=["train", "validation", "test"]),
    )


def test_template_key_drops_brackets():
    assert (
        ssv2_template_key("Putting [something] on [something]") == "Putting something on something"
    )


def test_ssv2_manifest_skips_bad_entries_and_warns_about_missing_videos(ssv2, tmp_path):
    cfg = config(ssv2)
    with pytest.warns(RuntimeWarning) as record:
        df = build_manifest(cfg)
    messages = " | ".join(str(w.message) for w in record)
    assert (
        "train.json: skipped 2 entries" in messages
        and "Juggling" in messages
        and "entry 3" in messages
    )
    assert "1 video files are missing" in messages and "31.webm" in messages
    assert list(df.columns) == MANIFEST_COLUMNS
    assert df["clip_id"].tolist() == ["11", "12", "21", "31"]
    assert df["label"].tolist() == [0, 1, 1, -1]
    assert df["split"].tolist() == ["train", "train", "validation", "test"]
    assert df["shard"].tolist() == [0, 0, 1, 1]
    assert (df[["start_frame", "stop_frame", "verb_class", "noun_class"]] == -1).all().all()
    assert df["video_path"].iloc[0].endswith(os.path.join("videos", "11.webm"))
    with pytest.warns(RuntimeWarning):  # the skipped entries, not the videos
        assert count_clips(cfg) == len(df)
        assert shard_names(cfg) == ["shard-0000", "shard-0001"]
    # decode a shard straight from the manifest: webm decodes, the missing video fails alone
    status = decode_shard(
        select_shard(df, "shard-0001"), tmp_path / "frames" / "shard-0001",
        {**load_config()["decode"], "short_side": 16}
    )
    assert status["status"].tolist() == ["ok", "failed"]
    store = FrameStore(tmp_path / "frames" / "shard-0001")
    assert (
        store.clip_ids == ["21"]
        and store.meta("21")["height"] == 16
        and store.meta("21")["width"] == 32
    )


def test_ssv2_bad_labels_file_is_an_error(ssv2):
    labels = os.path.join(ssv2["ssv2"]["root"], "labels.json")
    with open(labels, "w") as fh:
        fh.write("{not json")
    with pytest.raises(AnnotationError, match="labels.json: invalid JSON"):
        build_manifest(config(ssv2))


# ---------------------------------------------------------------------------------- EPIC-100
@pytest.fixture
def epic(tmp_path):
    ann, vids = tmp_path / "ann", tmp_path / "videos"
    (vids / "P01" / "videos").mkdir(parents=True)
    (vids / "P03").mkdir(parents=True)
    ann.mkdir()
    # the three layouts of the download scripts
    write_video(vids / "P01" / "videos" / "P01_01.MP4", numbered(30), codec="libx264")
    write_video(vids / "P02_03.MP4", numbered(12), codec="libx264")
    write_video(vids / "P03" / "P03_01.MP4", numbered(12), codec="libx264")

    def row(nid, pid, vid, start, stop, verb, noun):
        return dict(
            narration_id=nid,
            participant_id=pid,
            video_id=vid,
            narration_timestamp="00:00:01.000",
            start_timestamp="00:00:01.00",
            stop_timestamp="00:00:02.00",
            start_frame=start,
            stop_frame=stop,
            narration="open door",
            verb="open",
            verb_class=verb,
            noun="door",
            noun_class=noun,
            all_nouns="['door']",
            all_noun_classes="[3]",
        )

    train = pd.DataFrame(
        [
            row("P01_01_0", "P01", "P01_01", 11, 20, 3, 7),
            row("P01_01_1", "P01", "P01_01", 20, 15, 2, 1),  # stop < start: skipped
            row("P02_03_0", "P02", "P02_03", 1, 12, "", 4),  # no verb_class: skipped
            row("P02_03_1", "P02", "P02_03", 1, 12, 5, 4),
        ],
        columns=EPIC_COLUMNS,
    )
    train.to_csv(ann / "EPIC_100_train.csv", index=False)
    val = pd.DataFrame(
        [
            row("P03_01_0", "P03", "P03_01", 2, 5, 0, 9),
            row("P04_01_0", "P04", "P04_01", 1, 9, 1, 2),
        ],
        columns=EPIC_COLUMNS,
    )
    val.to_csv(ann / "EPIC_100_validation.csv", index=False)
    pd.DataFrame(
        {
            "video_id": ["P01_01", "P02_03"],
            "duration": [1.0, 1.0],
            "fps": [50.0, 59.94],
            "resolution": ["1920x1080"] * 2,
        }
    ).to_csv(ann / "EPIC_100_video_info.csv", index=False)
    return dict(
        name="epic100",
        epic100=dict(annotations_dir=str(ann), video_dir=str(vids), splits=["train", "validation"]),
    )


def test_epic_manifest_frames_paths_and_bad_rows(epic, tmp_path):
    cfg = config(epic, clips_per_shard=8)
    with pytest.warns(RuntimeWarning) as record:
        df = build_manifest(cfg)
    messages = " | ".join(str(w.message) for w in record)
    assert "EPIC_100_train.csv: skipped 2 rows" in messages
    assert (
        "line 3 (P01_01_1): bad frame range 20..15" in messages and "line 4 (P02_03_0)" in messages
    )
    assert "1 video files are missing" in messages and "P04_01" in messages
    df = df.set_index("clip_id")
    assert df.index.tolist() == ["P01_01_0", "P02_03_1", "P03_01_0", "P04_01_0"]
    # EPIC frames are 1-based, the manifest 0-based inclusive
    assert df.loc["P01_01_0", ["start_frame", "stop_frame"]].tolist() == [10, 19]
    assert df.loc["P01_01_0", ["label", "verb_class", "noun_class"]].tolist() == [3, 3, 7]
    assert df.loc["P01_01_0", "video_path"].endswith(os.path.join("P01", "videos", "P01_01.MP4"))
    assert df.loc["P02_03_1", "video_path"].endswith(os.path.join("videos", "P02_03.MP4"))
    assert df.loc["P03_01_0", "video_path"].endswith(os.path.join("P03", "P03_01.MP4"))
    assert df.loc["P01_01_0", "fps"] == 50.0 and np.isnan(df.loc["P03_01_0", "fps"])
    assert df["split"].tolist() == ["train", "train", "validation", "validation"]
    with pytest.warns(RuntimeWarning):
        # 8 per shard, lowered to 2 so that 4 clips still make shards.min_shards (2) shards
        assert count_clips(cfg) == 4 and shard_names(cfg) == ["shard-0000", "shard-0001"]
    # the decoded segment holds exactly EPIC frames 11..20 (0-based 10..19)
    status = decode_shard(df.reset_index().iloc[:1], tmp_path / "s",
                          {**load_config()["decode"], "short_side": 0})
    assert status["n_frames"].tolist() == [10]
    levels = FrameStore(tmp_path / "s").read("P01_01_0").mean(axis=(1, 2, 3))
    assert np.round((levels - 20) / 8).astype(int).tolist() == list(range(10, 20))


def test_epic_missing_column_names_the_file(epic):
    path = os.path.join(epic["epic100"]["annotations_dir"], "EPIC_100_validation.csv")
    pd.read_csv(path).drop(columns=["verb_class"]).to_csv(path, index=False)
    with (
        pytest.warns(RuntimeWarning, match="skipped 2 rows"),
        pytest.raises(
            AnnotationError, match=r"EPIC_100_validation.csv: missing columns \['verb_class'\]"
        ),
    ):
        build_manifest(config(epic))


# ---------------------------------------------------------------------------------- list files
def test_list_files(tmp_path):
    root = tmp_path / "ucf"
    write_video(root / "videos" / "a.mp4", n_frames=4)
    write_video(tmp_path / "elsewhere" / "b c.mp4", n_frames=4)
    (tmp_path / "train.txt").write_text(
        f"videos/a.mp4 0\n\n{tmp_path / 'elsewhere' / 'b c.mp4'} 1\n"
    )
    (tmp_path / "val.txt").write_text("videos/a.mp4 2\n")
    cfg = config(
        dict(
            name="list",
            list=dict(
                root=str(root),
                files={
                    "train": str(tmp_path / "train.txt"),
                    "validation": str(tmp_path / "val.txt"),
                },
            ),
        )
    )
    df = build_manifest(cfg)
    assert df["label"].tolist() == [0, 1, 2]
    assert df["video_path"].tolist() == [
        str(root / "videos" / "a.mp4"),
        str(tmp_path / "elsewhere" / "b c.mp4"),
        str(root / "videos" / "a.mp4"),
    ]
    assert df["clip_id"].iloc[0] == "videos_a" and df["clip_id"].iloc[2] == "videos_a__2"
    assert df["clip_id"].iloc[1].endswith("elsewhere_b_c")
    assert df["split"].tolist() == ["train", "train", "validation"]
    assert count_clips(cfg) == 3


@pytest.mark.parametrize(
    "line, problem",
    [
        ("videos/a.mp4 abc", "label 'abc'"),
        ("videos/a.mp4", "expected 'path label'"),
        ("videos/a.mp4 -1", "label '-1'"),
        ("videos/a.mp4 1.5", "label '1.5'"),
    ],
)
def test_list_malformed_line_names_file_and_line(tmp_path, line, problem):
    (tmp_path / "train.txt").write_text(f"videos/b.mp4 0\n{line}\n")
    cfg = config(
        dict(
            name="list", list=dict(root=str(tmp_path), files={"train": str(tmp_path / "train.txt")})
        )
    )
    with pytest.raises(AnnotationError, match="train.txt:2: ") as err:
        build_manifest(cfg)
    assert problem in str(err.value)


def test_annotation_files_are_the_files_the_adapters_read(ssv2, epic, tmp_path):
    """The manifest rule's inputs (rules/common.smk) come from here: each listed file is one
    the adapter reads, so removing it fails the manifest naming that file."""
    for dataset in (ssv2, epic):
        cfg = config(dataset)
        files = annotation_files(cfg["dataset"])
        assert files and all(Path(f).exists() for f in files)
        for f in files:
            moved = Path(f).rename(f + ".away")
            with pytest.raises(AnnotationError, match=Path(f).name):
                build_manifest(cfg)
            moved.rename(f)
    ssv2_root = ssv2["ssv2"]["root"]
    assert annotation_files(config(ssv2)["dataset"]) == [
        f"{ssv2_root}/{name}.json" for name in ("labels", "train", "validation", "test")
    ]
    listed = config(dict(name="list", list=dict(files={"train": "t.txt", "validation": None})))
    assert annotation_files(listed["dataset"]) == ["t.txt"]  # a null split is dropped
    demo_cfg = config(dict(name="demo"))["dataset"]
    assert annotation_files(demo_cfg) == [f"{demo_cfg['demo']['root']}/clips.csv"]


def test_list_split_must_be_known(tmp_path):
    write_video(tmp_path / "a.mp4", n_frames=3)
    (tmp_path / "l.txt").write_text("a.mp4 0\n")
    with pytest.raises(ConfigError, match="'holdout' is not one of"):  # the schema says so
        config(
            dict(name="list", list=dict(root=str(tmp_path), files={"holdout": str(tmp_path / "l.txt")}))
        )


# ---------------------------------------------------------------------------------- demo
def test_demo_manifest_from_the_generator(tmp_path):
    demo_cfg = dict(
        root=str(tmp_path / "demo"),
        train_clips_per_class=1,
        val_clips_per_class=1,
        num_frames=4,
        height=32,
        width=48,
        classes=["left", "grow", "clockwise"],
    )
    cfg = config(dict(name="demo", demo=demo_cfg), clips_per_shard=4)
    assert count_clips(cfg) == 6 and shard_names(cfg) == ["shard-0000", "shard-0001"]
    with pytest.raises(AnnotationError, match="clips.csv not found"):
        build_manifest(cfg)
    demo.generate(cfg["dataset"]["demo"])
    df = build_manifest(cfg)
    # 4 per shard, lowered to 3 so that 6 clips make shards.min_shards (2) shards
    assert len(df) == 6 and df["shard"].tolist() == [0, 0, 0, 1, 1, 1]
    assert all(os.path.exists(p) for p in df["video_path"])
    assert df["label"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (df["fps"] == 12.0).all()
    bigger = config(dict(name="demo", demo=dict(demo_cfg, train_clips_per_class=2)))
    with pytest.raises(ManifestError, match="regenerate"):
        build_manifest(bigger)


# ---------------------------------------------------------------------------------- manifest IO
def _manifest() -> pd.DataFrame:
    return pd.DataFrame(
        dict(
            clip_id=["0001", "b"],
            video_path=["x/0001.webm", "y.mp4"],
            label=[3, -1],
            verb_class=[-1, -1],
            noun_class=[-1, -1],
            split=["train", "test"],
            start_frame=[-1, 4],
            stop_frame=[-1, 9],
            fps=[float("nan"), 25.0],
            shard=[0, 0],
        )
    )


def test_manifest_round_trip_keeps_types(tmp_path):
    path = write_manifest(_manifest(), tmp_path / "manifest.csv")
    back = read_manifest(path)
    assert back["clip_id"].tolist() == ["0001", "b"]  # ids stay strings
    assert back["label"].dtype == np.int64 and back["fps"].dtype == np.float64
    assert back.equals(_manifest().astype(back.dtypes.to_dict()))


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: d.assign(label=["x", 1]), "column 'label' must be integers"),
        (lambda d: d.drop(columns=["shard"]), "missing columns ['shard']"),
        (lambda d: d.assign(clip_id=["a", "a"]), "appears more than once"),
        (lambda d: d.assign(clip_id=["a/b", "c"]), "not file-name safe"),
        (lambda d: d.assign(stop_frame=[-1, 2]), "bad frame range"),
        (lambda d: d.assign(split=["train", "dev"]), "split 'dev'"),
    ],
)
def test_read_manifest_rejects_garbage_and_names_the_file(tmp_path, change, problem):
    path = tmp_path / "manifest.csv"
    change(_manifest()).to_csv(path, index=False)
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_shard_helpers():
    assert shard_index("shard-0012") == 12 and shard_index(3) == 3
    with pytest.raises(ValueError):
        shard_index("shard-x")
    with pytest.raises(ManifestError, match="shard-0005"):
        select_shard(_manifest(), 5)
    assert safe_id("P01/videos/a b.MP4") == "P01_videos_a_b.MP4"
