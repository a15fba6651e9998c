"""Cluster operations at full scale without a cluster: how many SLURM jobs a Something-Something
V2 run submits (dry run through this checkout's profiles/slurm on annotation files with SSV2's
168,913 training and 24,777 validation ids; no video is needed to count shards) and that one
stage of one shard can still be rerun on its own now that each shard's preprocessing chain is
one group job.

A dry run prints each group job once ("Group job motion_chain (jobs in lexicogr. order):", its
jobs indented below it) and every other job at the top level; a group is ONE sbatch submission,
and rules that run nothing (`all`, `motion`) are not submitted at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "slurm"
SSV2 = ROOT / "config" / "ssv2.yaml"
N_TRAIN, N_VAL = 168_913, 24_777  # SSV2's train.json / validation.json
CHAIN = ["decode", "motion_boxes", "motion_map", "motion_pictures", "optical_flow"]
NORUN = {"all", "motion"}  # target rules: Snakemake itself "runs" them, nothing is submitted

GROUP_RE = re.compile(r"^\[[^]]*\] Group job (\S+) \(jobs in lexicogr\. order\):$")
RULE_RE = re.compile(r"^(\s*)(?:local)?rule (\w+):$")
SHARD_RE = re.compile(r"^\s+wildcards: .*shard=(shard-\d{4})")


def dry_run_submissions(out: str) -> tuple[list[dict], Counter]:
    """The group jobs ({"id", "rules" (sorted), "shards"} each) and the single jobs (rule ->
    count) that a ``snakemake -n`` output lists: each group and each single job is one
    submission. Every shard's group has the same id: the shards are its connected components."""
    groups: list[dict] = []
    singles: Counter = Counter()
    current = None
    for line in out.splitlines():
        match = GROUP_RE.match(line)
        if match:
            current = {"id": match[1], "rules": [], "shards": set()}
            groups.append(current)
            continue
        match = SHARD_RE.match(line)
        if match and current is not None:
            current["shards"].add(match[1])
            continue
        match = RULE_RE.match(line)
        if not match:
            continue
        if match[1] and current is not None:  # indented: a job inside the current group
            current["rules"].append(match[2])
        else:
            current = None
            if match[2] not in NORUN:
                singles[match[2]] += 1
    for group in groups:
        group["rules"].sort()
    return groups, singles


def job_stats(out: str) -> dict[str, int]:
    """The "Job stats" table of a dry run: every job, grouped or not."""
    table = out.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE)}


@pytest.fixture(scope="module")
def ssv2_overlay(tmp_path_factory) -> Path:
    """SSV2 annotation files at full scale (ids only, no videos) and an overlay pointing the
    SSV2 config at them, with the results in the same temp folder."""
    base = tmp_path_factory.mktemp("ssv2-scale")
    root = base / "ssv2"
    root.mkdir()
    (root / "labels.json").write_text(
        json.dumps({"Holding something": "0", "Pushing something": "1"})
    )
    for split, n, first in (("train", N_TRAIN, 1), ("validation", N_VAL, 500_000)):
        entries = [
            {
                "id": str(first + i),
                "template": "Holding [something]" if i % 2 else "Pushing [something]",
            }
            for i in range(n)
        ]
        (root / f"{split}.json").write_text(json.dumps(entries))
    overlay = {
        "results_dir": str(base / "results"),
        "dataset": {"ssv2": {"root": str(root), "video_dir": str(root / "videos")}},
        "tracking": {"mlflow": {"enabled": False}},
    }
    path = base / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def dry_run(overlay: Path, *args: str) -> str:
    """``snakemake -n --profile <checkout>/profiles/slurm`` on the SSV2 config plus ``overlay``:
    the profile by path, not by the name ``slurm`` (docs/CLUSTER.md "Running on a SLURM
    cluster"), so that the test reads this
    checkout's profile whatever ~/.config/snakemake/slurm links to (tests/test_profile.py
    checks the name)."""
    work = overlay.parent / "work"
    work.mkdir(exist_ok=True)
    if not (work / "config").exists():
        (work / "config").symlink_to(ROOT / "config")  # the Snakefile's configfile: is relative
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--profile",
        str(PROFILE),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(work),
        "--configfile",
        str(SSV2),
        str(overlay),
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MOFO_"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_ssv2_submits_one_job_per_shard_chain(ssv2_overlay):
    """docs/CLUSTER.md "One job per shard": 3,806 SLURM jobs without groups, 778 with them."""
    out = dry_run(ssv2_overlay)
    shards = -(-(N_TRAIN + N_VAL) // 256)  # config/ssv2.yaml: 256 clips per shard
    assert shards == 757
    stats = job_stats(out)
    # The DAG itself is unchanged: every stage still has one job (and its outputs) per shard.
    for rule in CHAIN:
        assert stats[rule] == shards, (rule, stats)
    ungrouped = sum(n for rule, n in stats.items() if rule not in NORUN | {"total"})
    assert ungrouped == 3806

    groups, singles = dry_run_submissions(out)
    assert len(groups) == shards
    assert all(g["id"] == "motion_chain" and g["rules"] == CHAIN for g in groups), groups[0]
    # One shard per job, every shard once.
    assert all(len(g["shards"]) == 1 for g in groups), [g for g in groups if len(g["shards"]) != 1]
    assert set().union(*(g["shards"] for g in groups)) == {f"shard-{i:04d}" for i in range(shards)}
    assert dict(singles) == {
        "manifest": 1,
        "box_quality": 1,
        "pretrain": 2,
        "finetune": 5,  # scratch + the paper's four
        "evaluate": 5,
        "features": 3,  # tube, mofo and the random reference
        "probe": 3,
        "table": 1,
    }
    assert len(groups) + sum(singles.values()) == 778


def test_one_stage_of_one_shard_reruns_alone(ssv2_overlay, tmp_path):
    """``--forcerun motion_boxes`` on one shard's boxes: one submission, motion_boxes only --
    not the shard's whole chain (the temporary flow is gone and is not recomputed).

    The outputs it fakes go to a results folder (and a working directory) of its own, not the
    module fixture's, which the full dry run above reads in whichever order the two run."""
    overlay = yaml.safe_load(ssv2_overlay.read_text())
    overlay["results_dir"] = str(tmp_path / "results")
    own_overlay = tmp_path / "overlay.yaml"
    own_overlay.write_text(yaml.safe_dump(overlay))
    results = tmp_path / "results" / "ssv2"
    shard = "shard-0003"
    existing = [
        results / "manifest.csv",
        *(
            results / "frames" / f"{shard}{ext}"
            for ext in (".jpgpack", ".index.csv", ".status.csv")
        ),
        results / "motion_map" / f"{shard}.npz",
        results / "motion_map" / f"{shard}.rawflow.npz",
        results / "boxes" / f"{shard}.csv",
    ]
    for i, path in enumerate(existing):  # made in pipeline order, each newer than its inputs
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        os.utime(path, (2e9 + i, 2e9 + i))
    out = dry_run(
        own_overlay, "--forcerun", "motion_boxes", "--", str(results / "boxes" / f"{shard}.csv")
    )
    groups, singles = dry_run_submissions(out)
    assert groups == [{"id": "motion_chain", "rules": ["motion_boxes"], "shards": {shard}}], (
        groups,
        out[-3000:],
    )
    assert not singles, singles
