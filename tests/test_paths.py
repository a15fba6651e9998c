"""The results layout has one owner, mofo.paths: the rules, the workflow scripts and the
resume check take their paths from it, and a training stage's inputs are declared once
(``paths.training_inputs``) for both the DAG and the provenance digest.

The main check moves files in ``paths.LAYOUT`` (in a subprocess) and dry-runs the DAG: the
moved paths must be what the jobs plan to write and read, no job may still name the old
place, and the resume check (``mofo.runtime.data.input_files``) must name what the
pretraining rule declares.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mofo import paths
from mofo.config import load_config
from mofo.data.decode import status_path
from mofo.formats.framestore import index_path, pack_path
from mofo.motion.boxes import rawflow_csv_path, report_path
from mofo.provenance import PRETRAINING_NAME, pretraining_spec
from tests.smkwork import snakemake_cmd, snakemake_workdir

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / ".test" / "config" / "tiny.yaml"

# Every role of a training stage's inputs moves: manifest, frames, boxes, trajectories, flow.
MOVED = {
    "manifest": "tables/manifest.csv",
    "frames": "decoded/{shard}",
    "boxes": "motionboxes/{shard}.csv",
    "trajectories": "mme/{shard}.traj.npz",
    "pooled_flow": "flowpool/{shard}.npz",
}
OLD_PLACES = re.compile(r"^(manifest\.csv$|frames/|boxes/|trajectories/)|\.pooled\.npz$")

# Runs in the subprocess: move the files, report the resume check's names, dry-run the DAG.
HELPER = '''
import json
import sys

import mofo.paths as paths

paths.LAYOUT.update(json.loads(sys.argv[1]))

from mofo.runtime.data import input_files

names = sorted(input_files(sys.argv[2], sys.argv[3], trajectories=True, pooled_flow=True))
print("INPUT_FILES " + json.dumps(names), flush=True)

from snakemake.cli import main

main(sys.argv[4:])
'''


def planned_jobs(dry_run: str) -> list[tuple[str, list[str], list[str]]]:
    """``(rule, inputs, outputs)`` of every job a dry run prints (group jobs included)."""
    jobs: list[tuple[str, list[str], list[str]]] = []
    for line in dry_run.splitlines():
        if m := re.match(r"^\s*rule (\w+):$", line):
            jobs.append((m[1], [], []))
        elif (m := re.match(r"^\s*(input|output): (.*)$", line)) and jobs:
            jobs[-1][1 if m[1] == "input" else 2].extend(m[2].split(", "))
    return jobs


def tiny_manifest(path: Path, shards: list[str]) -> Path:
    """A valid manifest with one clip per shard (the resume check reads its shard column)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "clip_id": [f"c{i}" for i in range(len(shards))], "video_path": "v.mp4", "label": 0,
        "verb_class": -1, "noun_class": -1, "split": "train", "start_frame": -1,
        "stop_frame": -1, "fps": 25.0, "shard": [paths.shard_index(s) for s in shards],
    }).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def moved_layout(tmp_path_factory) -> dict:
    """A dry run of a flow-guided MME pretraining (it reads every kind of input) and of the
    motion target with the MOVED layout, and the resume check's names under it."""
    tmp = tmp_path_factory.mktemp("moved-layout")
    overlay = tmp / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"results_dir": str(tmp / "results"),
                                       "dataset": {"demo": {"root": str(tmp / "demo")}},
                                       "tracking": {"mlflow": {"enabled": False}}}))
    config = load_config([TINY, overlay])
    results = paths.results_root(config)
    shards = ["shard-0000", "shard-0001"]  # tiny.yaml: 16 clips, 8 per shard
    manifest = tiny_manifest(tmp / "resume" / "manifest.csv", shards)
    target = paths.pattern("pretrain", results, file=paths.CHECKPOINT, masking="mgmae_mme",
                           seed=0)
    helper = tmp / "moved_layout.py"
    helper.write_text(HELPER)
    work = snakemake_workdir(tmp)
    args = snakemake_cmd(work, "-n", "--cores", "1", target, "motion",
                         "--configfile", str(TINY), str(overlay))[3:]  # after `-m snakemake`
    result = subprocess.run([sys.executable, str(helper), json.dumps(MOVED), str(manifest),
                             str(tmp / "resume"), *args], cwd=work, capture_output=True,
                            text=True, timeout=600, check=False)
    shutil.rmtree(work, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    names = json.loads(re.search(r"^INPUT_FILES (.*)$", result.stdout, flags=re.M)[1])
    return {"results": results, "shards": shards, "jobs": planned_jobs(result.stdout),
            "input_files": names}


def test_moved_layout_is_what_the_motion_jobs_write(moved_layout: dict):
    results = moved_layout["results"]
    boxes_jobs = [job for job in moved_layout["jobs"] if job[0] == "motion_boxes"]
    assert len(boxes_jobs) == 2
    outputs = {path for _, _, outs in boxes_jobs for path in outs}
    for shard in moved_layout["shards"]:
        assert f"{results}/motionboxes/{shard}.csv" in outputs
        assert f"{results}/motionboxes/{shard}.rawflow.csv" in outputs  # BESIDE the boxes
        assert f"{results}/motionboxes/{shard}.report.json" in outputs
    decode = {path for rule, _, outs in moved_layout["jobs"] if rule == "decode" for path in outs}
    assert f"{results}/decoded/shard-0000.jpgpack" in decode
    assert f"{results}/decoded/shard-0000.status.csv" in decode


def test_no_job_names_an_old_place(moved_layout: dict):
    results = moved_layout["results"]
    stale = sorted({f"{rule}: {path}" for rule, ins, outs in moved_layout["jobs"]
                    for path in ins + outs if path.startswith(results + "/")
                    and OLD_PLACES.search(path.removeprefix(results + "/"))})
    assert not stale, "rules that still write the layout themselves:\n" + "\n".join(stale)


def test_pretraining_reads_what_its_resume_check_digests(moved_layout: dict):
    results = moved_layout["results"]
    (pretrain,) = [job for job in moved_layout["jobs"] if job[0] == "pretrain"]
    declared = {path.removeprefix(results + "/") for path in pretrain[1]}
    for shard in moved_layout["shards"]:
        for moved in ("decoded/{}.jpgpack", "motionboxes/{}.csv", "mme/{}.traj.npz",
                      "flowpool/{}.npz"):
            assert moved.format(shard) in declared
    assert "tables/manifest.csv" in declared
    # the resume check digests a frame pack by its index; otherwise the same files
    digested = {paths.sibling(p, "frames_pack", "frames_index") if p.endswith(".jpgpack") else p
                for p in declared}
    assert digested == set(moved_layout["input_files"])


def test_pattern_fills_the_wildcards_it_is_given():
    assert paths.pattern("boxes", "r/demo") == "r/demo/boxes/{shard}.csv"
    assert paths.pattern("finetune", "r", file=paths.CHECKPOINT, seed=1) == (
        "r/finetune/{masking}-{head}/s1/checkpoint.pt")
    assert paths.pattern("features", file=paths.FEATURES, split="train", masking="random",
                         seed=2) == "features/random/s2/train.npz"
    assert paths.wildcards("eval", paths.METRICS) == ["masking", "head", "seed"]
    with pytest.raises(KeyError, match=r"has no wildcard \['head'\]"):
        paths.pattern("pretrain", head="mca")
    with pytest.raises(KeyError, match="no results path named 'box'"):
        paths.pattern("box")


def test_the_writers_name_the_files_beside_as_the_layout_does():
    prefix = paths.pattern("frames", "r", shard="shard-0002")
    boxes = paths.pattern("boxes", "r", shard="shard-0002")
    written = {"frames_pack": pack_path(prefix), "frames_index": index_path(prefix),
               "frames_status": status_path(prefix), "raw_flow_boxes": rawflow_csv_path(boxes),
               "boxes_report": report_path(boxes)}
    assert set(written) == set(paths.BESIDE)
    for key, path in written.items():
        assert path.as_posix() == paths.pattern(key, "r", shard="shard-0002"), key
        assert paths.base_of(path, key) == (prefix if key.startswith("frames") else boxes)


def test_shard_names_match_the_shard_wildcard():
    for index in (0, 7, 9999):
        assert re.fullmatch(paths.SHARD_WILDCARD, paths.shard_name(index))
        assert paths.shard_index(paths.shard_name(index)) == index
    with pytest.raises(ValueError, match="not a shard name"):
        paths.shard_index("shard-x")


def test_the_schema_and_the_rules_use_the_one_pretraining_name_pattern():
    schema = yaml.safe_load((ROOT / "config" / "config.schema.yaml").read_text())
    masking = schema["properties"]["variants"]["additionalProperties"]["properties"]["masking"]
    assert masking["pattern"] == f"^{PRETRAINING_NAME}$"
    common = (ROOT / "rules" / "common.smk").read_text()
    assert re.search(r"^\s+masking=PRETRAINING_NAME,", common, flags=re.M)
    for name in ("tube", "mofo_mme", "mgmae"):
        assert re.fullmatch(PRETRAINING_NAME, name) and pretraining_spec(name)
    for name in ("tube_", "Tube", "tube_mme_x", "tube_pixels"):
        with pytest.raises(ValueError, match="pretraining name"):
            pretraining_spec(name)


def test_rules_and_scripts_build_no_results_path_themselves():
    """RESULTS and the layout are spelled in mofo/paths.py only (rules use P / filled)."""
    files = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk")),
             *sorted((ROOT / "workflow" / "scripts").glob("*.py"))]
    hand_built = re.compile(r"""\{RESULTS\}/|RESULTS \+|\["results_dir"\]""")
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in files for n, line in enumerate(path.read_text().splitlines(), 1)
             if hand_built.search(line)]
    assert not found, "\n".join(found)
