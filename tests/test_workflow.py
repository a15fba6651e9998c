"""The Snakemake workflow itself: dry run, lint, and the motion stages end to end on a tiny
demo config (real videos, real flow), including a corrupt video in the middle of a shard."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.smkwork import run_snakemake

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / ".test" / "config" / "tiny.yaml"


def snakemake(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Snakemake on the repository's Snakefile in a fresh working directory of its own
    (tests/smkwork.py: no ``.snakemake/`` shared with other tests)."""
    return run_snakemake(*args, timeout=timeout)


@pytest.fixture()
def tiny_overlay(tmp_path: Path) -> Path:
    """The tiny CI config with every output redirected into tmp_path."""
    overlay = {
        "results_dir": str(tmp_path / "results"),
        "dataset": {"demo": {"root": str(tmp_path / "demo")}},
        "tracking": {"mlflow": {"enabled": False}},
    }
    path = tmp_path / "paths.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def job_counts(dry_run_output: str) -> dict[str, int]:
    table = dry_run_output.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


def test_dry_run_lists_every_stage_per_shard(tiny_overlay: Path):
    result = snakemake("-n", "--configfile", str(TINY), str(tiny_overlay))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    n_shards = 2  # 16 tiny clips, 8 per shard
    for rule in ("decode", "optical_flow", "motion_map", "motion_boxes", "motion_pictures"):
        assert counts[rule] == n_shards, (rule, counts)
    # 5 variants (scratch + the paper's four) x 1 seed; scratch has no pretraining.
    assert counts["pretrain"] == 2 and counts["finetune"] == 5 and counts["evaluate"] == 5
    assert counts["table"] == 1


def test_dry_run_runs_every_variant_per_seed(tiny_overlay: Path, tmp_path: Path):
    """seeds: [0, 3] -> every pretraining, fine-tuning and evaluation once per seed, under
    s<seed>/, and the scratch fine-tuning without a pretrained input."""
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text("seeds: [0, 3]\n")
    result = snakemake("-n", "--configfile", str(TINY), str(tiny_overlay), str(seeds))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts["pretrain"] == 4 and counts["finetune"] == 10 and counts["evaluate"] == 10
    for seed in (0, 3):
        for path in (f"pretrain/mofo/s{seed}/checkpoint.pt", f"finetune/scratch-mean/s{seed}/checkpoint.pt",
                     f"eval/tube-mca/s{seed}/metrics.json"):
            assert path in result.stdout, path
    assert "pretrain/scratch" not in result.stdout


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Congratulations" in result.stdout + result.stderr


def test_bad_config_value_stops_with_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optical_flow:\n  method: raft\n")
    result = snakemake("-n", "--configfile", str(bad))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "raft" in output and "optical_flow" in output and "method" in output


@pytest.mark.parametrize("overlay", [
    "masking:\n  strategy: nope\n",
    "variants:\n  odd:\n    label: Odd\n    masking: nope_mme\n    head: mean\n",
])
def test_an_unregistered_masking_strategy_stops_the_dry_run(tmp_path: Path, overlay: str):
    """The masking registry is the one list of strategies (the schema checks only the form):
    the workflow checks every pretraining's strategy, and the default, before planning."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(overlay)
    result = snakemake("-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert ("unknown masking strategy 'nope'; choose one of ['everest', 'mgmae', 'mofo', "
            "'tube']") in result.stdout + result.stderr


@pytest.mark.slow
def test_motion_stages_end_to_end_and_a_corrupt_video(tiny_overlay: Path, tmp_path: Path):
    result = snakemake("motion", "--cores", "2", "--configfile", str(TINY), str(tiny_overlay))
    assert result.returncode == 0, result.stderr[-4000:]
    res = tmp_path / "results" / "demo"
    quality = json.loads((res / "motion" / "box_quality.json").read_text())
    assert quality["n_clips"] == 16
    for key in ("mean_iou", "raw_flow_mean_iou", "token_grid_iou"):
        assert 0.0 <= quality[key] <= 1.0
    assert set(quality["by_camera_motion"]) == {"true", "false"}
    # Motion boxes must find the moving object far better than a fixed centre box.
    assert quality["mean_iou"] > quality["centre_box_mean_iou"] + 0.1
    # The flow is temporary; the picture clips' flow and the pooled flow are kept.
    assert sorted(p.name for p in (res / "flow").glob("*.npz")) == [
        "shard-0000.pictures.npz", "shard-0000.pooled.npz",
        "shard-0001.pictures.npz", "shard-0001.pooled.npz"]
    assert list((res / "motion" / "pictures" / "shard-0000").glob("*.png"))
    # MME rows added after the run (the study after `make demo`): their trajectories jobs
    # recompute the flow from the frames, so nothing of the motion chain runs again.
    study = ROOT / "config" / "demo-study.yaml"
    result = snakemake("-n", "--configfile", str(TINY), str(study), str(tiny_overlay))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts["trajectories"] == 2, counts
    assert not {"decode", "optical_flow", "motion_map", "motion_boxes"} & set(counts), counts

    # Corrupt one video of shard 0 and rebuild that shard: the clip is reported failed with
    # its file named, every other clip of the shard still gets its boxes.
    manifest = pd.read_csv(res / "manifest.csv")
    victim = manifest[manifest["shard"] == 0].iloc[3]
    video = Path(victim["video_path"])
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    result = snakemake(
        str(res / "motion" / "box_quality.json"), "--cores", "2", "--forcerun", "decode",
        "--configfile", str(TINY), str(tiny_overlay),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    status = pd.read_csv(res / "frames" / "shard-0000.status.csv")
    bad = status[status["clip_id"] == victim["clip_id"]].iloc[0]
    assert bad["status"] == "failed" and video.name in bad["message"]
    boxes = pd.read_csv(res / "boxes" / "shard-0000.csv")
    assert victim["clip_id"] not in set(boxes["clip_id"])
    assert boxes["clip_id"].nunique() == 7
    assert json.loads((res / "motion" / "box_quality.json").read_text())["n_clips"] == 15


def test_demo_study_lists_the_other_methods_per_seed(tiny_overlay: Path):
    """config/demo-study.yaml: three seeds of every variant, the EVEREST / MGMAE / MME rows
    included (their pretraining, fine-tuning and evaluation jobs), MME's trajectories once."""
    study = ROOT / "config" / "demo-study.yaml"
    result = snakemake("-n", "--configfile", str(TINY), str(study), str(tiny_overlay))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    # 8 full-label variants and 4 x 2 few-label rows, 3 seeds each; the few-label rows share
    # the pretrainings (no pretrain job of their own)
    assert counts["pretrain"] == 5 * 3 and counts["finetune"] == 16 * 3 and counts["evaluate"] == 16 * 3
    assert counts["trajectories"] == 2  # one per shard, shared by the seeds
    for seed in (0, 1, 2):
        for path in (f"pretrain/everest/s{seed}/", f"pretrain/mgmae/s{seed}/", f"pretrain/tube_mme/s{seed}/",
                     f"eval/mgmae-mean/s{seed}/metrics.json", f"eval/tube_mme-mean/s{seed}/metrics.json",
                     f"finetune/scratch-mean_l10/s{seed}/", f"eval/mofo-mca_l25/s{seed}/metrics.json"):
            assert path in result.stdout, path
    assert "wildcards: masking=tube, head=mean_l10, seed=2" in result.stdout


def test_a_label_share_that_is_no_whole_percent_stops_the_dry_run(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  odd:\n    label: Odd\n    masking: tube\n    head: mean\n"
                   "    label_fraction: 0.125\n")
    result = snakemake("-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert "variants.odd: label_fraction 0.125" in result.stdout + result.stderr
