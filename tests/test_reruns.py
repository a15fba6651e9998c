"""Reruns do what the user means (real Snakemake runs on the tiny CI config).

A forced or triggered rerun of a training stage trains from step 0; a change reruns the
stages that read it (``mofo.provenance.STAGE_READS``) and nothing upstream; a setting a stage
does not read reruns nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_workflow import job_counts

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / ".test" / "config" / "tiny.yaml"
TARGET = "finetune/mofo-mean/s0/checkpoint.pt"
EVAL_TARGET = "eval/mofo-mean/s0/metrics.json"


class Run:
    """One tiny results folder and the snakemake command lines that work on it."""

    def __init__(self, root: Path):
        self.root = root
        self.res = root / "results" / "demo"
        self.paths = root / "paths.yaml"
        self.paths.write_text(yaml.safe_dump({
            "results_dir": str(root / "results"),
            "dataset": {"demo": {"root": str(root / "demo")}},
            "tracking": {"mlflow": {"enabled": False}},
        }))

    def overlay(self, name: str, content: dict) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(content))
        return path

    def snakemake(self, *args: str, overlays: tuple[Path, ...] = (), target: str = TARGET,
                  timeout: int = 900) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "--nolock", "--cores", "2",
               str(self.res / target), *args,
               "--configfile", str(TINY), str(self.paths), *map(str, overlays)]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    def dry_run(self, *overlays: Path, target: str = TARGET) -> dict[str, int]:
        out = self.snakemake("-n", overlays=overlays, target=target).stdout
        return {} if "Nothing to be done" in out else job_counts(out)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_trained_from_step_zero(stage_dir: Path, log: Path, since: float,
                                  expected_steps: int) -> None:
    """Every metrics record was written by the rerun, its steps run 1..N in full, the job's
    log (Snakemake starts it anew per job) has no 'resuming' line, and no checkpoint-last.pt
    is left behind."""
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["time"] >= since for r in records), "old metrics were kept"
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, expected_steps + 1)), steps
    assert records[-1]["type"] == "end" and records[-1]["step"] == expected_steps
    assert log.stat().st_mtime >= since and "running:" in log.read_text()
    assert "resuming from" not in log.read_text(), log.read_text()[-2000:]
    assert not (stage_dir / "checkpoint-last.pt").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Run:
    """Motion chain, `mofo` pretraining, `mofo-mean` fine-tuning and its evaluation of the
    tiny demo, once. Tests that use it only dry-run or write outside its results; the ones
    that rerun build their own."""
    run = Run(tmp_path_factory.mktemp("reruns-built"))
    run.snakemake(target=EVAL_TARGET)
    return run


@pytest.mark.slow
def test_changed_settings_rerun_exactly_the_stages_that_read_them(built: Run):
    assert built.dry_run() == {}
    # A box setting: boxes and everything trained on them; never the flow or what feeds it.
    boxes = built.dry_run(built.overlay("boxes", {"motion_boxes": {"rel_max_threshold": 0.3}}))
    assert boxes == {"motion_boxes": 2, "pretrain": 1, "finetune": 1, "total": 4}, boxes
    # Fine-tuning augmentation: fine-tuning only.
    aug = built.dry_run(built.overlay("aug", {"augment": {"random_erasing": 0.25}}))
    assert aug == {"finetune": 1, "total": 1}, aug
    # Settings no built stage reads: logging, loader workers, threads, test views, the demo's
    # picture count is read by flow (so it is not here).
    unread = built.overlay("unread", {
        "pretrain": {"log_interval": 3, "num_workers": 1, "n_reconstruction_clips": 2,
                     "target": "mme", "mme": {"cell": 4}},  # the pretraining name sets target
        "trajectories": {"steps": 2},  # read by trajectories and mme pretrainings only
        "finetune": {"checkpoint_every": 2},
        "engine": {"threads_per_job": 2, "cpu_threads": 2},
        "augment": {"test_crops": 3},
        "decode": {"threads": 2},
        "masking": {"strategy": "tube"},
    })
    assert built.dry_run(unread) == {}


#: The rerun claims of the README ("Rerunning one piece", now docs/RERUNS.md), setting by
#: setting: overlay on the tiny config -> the jobs a dry run of the evaluation then lists.
#: The frame cache and keeping the flow rerun nothing; the test views rerun only `evaluate`;
#: the picture count is read by the flow job (it keeps the picture clips' flow), so changing
#: it recomputes the flow -- and, from the new flow files on, every stage built on them.
README_RERUNS = {
    "frame_cache_mb": ({"pretrain": {"frame_cache_mb": 0}, "finetune": {"frame_cache_mb": 0}},
                       {}),
    "optical_flow.keep": ({"optical_flow": {"keep": True}}, {}),
    "augment.test_clips": ({"augment": {"test_clips": 2}}, {"evaluate": 1, "total": 1}),
    "pictures.clips_per_shard": (
        {"pictures": {"clips_per_shard": 2}},
        {"optical_flow": 2, "motion_map": 2, "motion_boxes": 2, "pretrain": 1, "finetune": 1,
         "evaluate": 1, "total": 9},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(README_RERUNS))
def test_documented_rerun_of_each_setting(built: Run, setting: str):
    overlay, expected = README_RERUNS[setting]
    jobs = built.dry_run(built.overlay(setting, overlay), target=EVAL_TARGET)
    assert jobs == expected, (setting, jobs)


def run_module(*args: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository, output captured."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.slow
def test_finetuning_stage_starts_from_a_hugging_face_folder(built: Run, tmp_path: Path):
    """docs/PIPELINE.md "Hugging Face checkpoints": the fine-tuning stage's ``--pretrained``
    takes a transformers VideoMAE folder. The folder is the tiny run's own pretraining,
    written by ``mofo export-hf`` (no hub); the stage, run with the pipeline fine-tuning job's
    own config, seed and inputs, trains the model the pipeline trained from checkpoint.pt --
    up to the folder's fc_norm eps (transformers fixes it at 1e-5, mofo uses 1e-6)."""
    res = built.res
    folder = tmp_path / "hf-mofo"
    export = run_module("mofo.cli", "export-hf", "--configfile", str(TINY),
                        str(res / "pretrain/mofo/s0/checkpoint.pt"), str(folder))
    assert export.returncode == 0, export.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    out = tmp_path / "finetune"
    stage = run_module("mofo.training.finetune",
                       "--config", str(res / "finetune/mofo-mean/s0/config.yaml"),
                       "--head", "mean", "--seed", "0", "--manifest", str(res / "manifest.csv"),
                       "--results-dir", str(res), "--pretrained", str(folder), "--out", str(out))
    assert stage.returncode == 0, stage.stderr[-3000:]
    report = json.loads((out / "load_report.json").read_text())
    assert report["source"] == str(folder), report["source"]
    assert report["notes"][0] == "Hugging Face VideoMAE folder", report["notes"]
    assert report["checkpoint_format"] == "pretrain"
    assert not report["missing"] and not report["unexpected"], report
    assert {k for k in report["loaded"] if k.startswith("blocks.")}, report["loaded"]
    tuned = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert tuned["meta"]["pretrained"] == str(folder)
    ours, pipeline = tuned["model"], weights(res / "finetune/mofo-mean/s0/checkpoint.pt")
    assert ours.keys() == pipeline.keys()
    worst = max(float((ours[k] - pipeline[k]).abs().max()) for k in ours)
    assert worst < 1e-5, f"fine-tuned from the folder: {worst} from the pipeline's weights"


@pytest.mark.slow
def test_loader_reports_clips_shorter_than_the_model_span(built: Run, tmp_path: Path):
    """docs/DATASETS.md "Bad input": a clip shorter than the model's span (``num_frames`` x
    ``sampling_rate``) is trained on, its frames spread over the clip and repeated, and the
    training loader logs how many clips that concerns -- in the stage's output, i.e. the
    job's log. The tiny demo's clips have 12 frames; 8 frames at stride 2 span 16."""
    res = built.res
    stride = tmp_path / "stride.yaml"
    stride.write_text(yaml.safe_dump({"model": {"sampling_rate": 2}}))
    stage = run_module("mofo.training.finetune",
                       "--config", str(res / "finetune/mofo-mean/s0/config.yaml"),
                       "--config", str(stride), "--head", "mean", "--seed", "0",
                       "--manifest", str(res / "manifest.csv"), "--results-dir", str(res),
                       "--max-steps", "1", "--out", str(tmp_path / "finetune"))
    assert stage.returncode == 0, stage.stderr[-3000:]
    message = (f"{res}/train: 12 of 12 clips have fewer than the model's 16-frame span; their "
               "frames are spread over the clip and repeated (mofo/inputs/sampling.py)")
    assert message in stage.stderr.splitlines(), stage.stderr[-3000:]


@pytest.mark.slow
def test_forced_and_triggered_reruns_train_from_step_zero(tmp_path: Path):
    run = Run(tmp_path)
    run.snakemake()
    pre_dir, ft_dir = run.res / "pretrain" / "mofo" / "s0", run.res / "finetune" / "mofo-mean" / "s0"
    pre_log, ft_log = run.res / "logs" / "pretrain" / "mofo-s0.log", run.res / "logs" / "finetune" / "mofo-mean-s0.log"
    steps = 2 * (12 // 4)  # tiny: 2 epochs of 12 clips in batches of 4
    first = weights(pre_dir / "checkpoint.pt")
    assert not (pre_dir / "checkpoint-last.pt").exists(), "a finished run keeps no resume point"

    # --forcerun: the whole schedule again (same seed on the CPU: the same weights).
    since = time.time()
    run.snakemake("--forcerun", "pretrain", target="pretrain/mofo/s0/checkpoint.pt")
    assert_trained_from_step_zero(pre_dir, pre_log, since, steps)
    assert same_weights(first, weights(pre_dir / "checkpoint.pt"))

    # New boxes: mofo pretraining reruns from step 0 and learns something else.
    since = time.time()
    boxes = run.overlay("boxes", {"motion_boxes": {"rel_max_threshold": 0.2, "blur_sigma": 5.0}})
    run.snakemake(overlays=(boxes,))
    assert_trained_from_step_zero(pre_dir, pre_log, since, steps)
    assert not same_weights(first, weights(pre_dir / "checkpoint.pt"))
    assert_trained_from_step_zero(ft_dir, ft_log, since, steps)

    # Fine-tuning augmentation: fine-tuning from step 0, pretraining untouched.
    pre_mtime = (pre_dir / "checkpoint.pt").stat().st_mtime_ns
    since = time.time()
    run.snakemake(overlays=(boxes, run.overlay("aug", {"augment": {"random_erasing": 0.25}})))
    assert_trained_from_step_zero(ft_dir, ft_log, since, steps)
    assert (pre_dir / "checkpoint.pt").stat().st_mtime_ns == pre_mtime
