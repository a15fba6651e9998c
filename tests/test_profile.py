"""`snakemake --profile slurm` from a fresh clone (docs/CLUSTER.md "Running on a SLURM cluster").

Snakemake looks a profile NAME up in the current directory, ${XDG_CONFIG_HOME:-~/.config}/
snakemake and /etc/xdg/snakemake -- never in ./profiles/ -- so the set-up step (`make install`
-> tools/install.sh, or `make profile`) links profiles/slurm into the per-user folder with
tools/link_profile.sh. These tests run that script and Snakemake in a temporary HOME and
XDG_CONFIG_HOME, never touching the real ones. A dry run needs no SLURM cluster and no video.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LINK = ROOT / "tools" / "link_profile.sh"
NOT_FOUND = "no profile.yaml (or config.yaml) found"


@pytest.fixture()
def home(tmp_path) -> dict[str, str]:
    """The environment of a user with an empty home and their own XDG_CONFIG_HOME."""
    (tmp_path / "home").mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "MOFO_", "SNAKEMAKE_", "XDG_"))
    }
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    return env


def link(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LINK), *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


@pytest.fixture()
def tiny_ssv2(tmp_path) -> Path:
    """Six train and six validation SSV2 ids (no videos: a dry run does not open them) and an
    overlay pointing dataset.ssv2 at them; only dataset, results and tracking keys, so the test
    does not depend on config/ssv2.yaml's training settings."""
    root = tmp_path / "ssv2"
    root.mkdir()
    labels = {"Holding something": "0", "Pushing something": "1"}
    (root / "labels.json").write_text(json.dumps(labels))
    for split, first in (("train", 1), ("validation", 100)):
        entries = [
            {"id": str(first + i), "template": f"{'Holding' if i % 2 else 'Pushing'} [something]"}
            for i in range(6)
        ]
        (root / f"{split}.json").write_text(json.dumps(entries))
    overlay = {
        "results_dir": str(tmp_path / "results"),
        "dataset": {
            "ssv2": {
                "root": str(root),
                "video_dir": str(root / "videos"),
                "splits": ["train", "validation"],
            }
        },
        "tracking": {"mlflow": {"enabled": False}},
    }
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def dry_run_by_name(env: dict[str, str], overlay: Path, *extra: str) -> subprocess.CompletedProcess:
    """``snakemake --profile slurm -n --configfile config/ssv2.yaml <overlay>`` started in the
    repository, as docs/CLUSTER.md says. ``-d`` keeps Snakemake's own .snakemake/ folder out of the
    checkout (the profile is looked up from the current directory, the repository, before it)."""
    work = overlay.parent / "work"
    work.mkdir(exist_ok=True)
    if not (work / "config").exists():
        (work / "config").symlink_to(ROOT / "config")  # the Snakefile's configfile: is relative
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "-d", str(work),
           "--configfile", "config/ssv2.yaml", str(overlay), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_profile_by_name_plans_after_the_setup_link(home, tiny_ssv2):
    # A fresh clone: the name is not found (the error this set-up step exists for), unless
    # the machine has a site-wide profile of that name.
    if not Path("/etc/xdg/snakemake/slurm").exists():
        before = dry_run_by_name(home, tiny_ssv2)
        assert before.returncode != 0 and NOT_FOUND in before.stderr, before.stderr[-2000:]

    done = link(home)
    assert done.returncode == 0, done.stderr
    dest = Path(home["XDG_CONFIG_HOME"]) / "snakemake" / "slurm"
    assert dest.is_symlink() and dest.resolve() == (ROOT / "profiles" / "slurm").resolve()

    proc = dry_run_by_name(home, tiny_ssv2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Using profile slurm for setting default command line arguments." in out
    # The profile's settings are in force: the shard chains are SLURM group jobs (a local run
    # ignores groups) and the training jobs get the profile's resources.
    assert "Group job motion_chain" in out, out[-3000:]
    assert "slurm_extra=--signal=USR1@600" in out
    assert "rule pretrain:" in out and "rule table:" in out
    # The recipe's total batches, split for the profile's one GPU per training job ...
    assert "mofo: pretrain: total batch 2048 = 32 clips x 1 process x 64 accumulation" in out
    assert "mofo: finetune: total batch 512 = 8 clips x 1 process x 64 accumulation" in out
    # ... and for `gpu: 8` (what the profile's set-resources would say, given on the line)
    eight = dry_run_by_name(home, tiny_ssv2, "--set-resources", "pretrain:gpu=8",
                            "finetune:gpu=8")
    out = eight.stdout + eight.stderr
    assert eight.returncode == 0, out[-3000:]
    assert "mofo: pretrain: total batch 2048 = 32 clips x 8 processes x 8 accumulation" in out
    assert "mofo: finetune: total batch 512 = 8 clips x 8 processes x 8 accumulation" in out


def test_setup_step_runs_the_link():
    """`make install` (tools/install.sh) and `make profile` both link the profile."""
    assert "bash tools/link_profile.sh" in (ROOT / "tools" / "install.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "profile:\n\tbash tools/link_profile.sh" in makefile


def test_link_is_idempotent_and_never_replaces_another_profile(home, tmp_path):
    dest_dir = Path(home["XDG_CONFIG_HOME"]) / "snakemake"
    first, again = link(home), link(home)
    assert first.returncode == 0 and again.returncode == 0, (first.stderr, again.stderr)
    assert "already" in again.stdout
    assert os.readlink(dest_dir / "slurm") == str((ROOT / "profiles" / "slurm").resolve())

    # Someone's own profile of that name (a folder), another checkout's link, a dangling link:
    # each is left exactly as it was, exit 1, and the message says what is there and what to do.
    own = dest_dir / "mine"
    own.mkdir()
    (own / "config.yaml").write_text("executor: slurm\n")
    (dest_dir / "other").symlink_to(tmp_path)
    (dest_dir / "gone").symlink_to(tmp_path / "deleted-checkout")
    for name, what in (("mine", "a folder"), ("other", f"a link to {tmp_path}"),
                       ("gone", "which does not exist")):  # fmt: skip
        proc = link(home, name)
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert "NOT linking" in proc.stderr and what in proc.stderr, proc.stderr
        assert f"snakemake --profile {ROOT.resolve()}/profiles/slurm" in proc.stderr
    assert (own / "config.yaml").read_text() == "executor: slurm\n"
    assert os.readlink(dest_dir / "other") == str(tmp_path)

    # Without XDG_CONFIG_HOME (or with it empty, as platformdirs reads it): ~/.config.
    proc = link({**home, "XDG_CONFIG_HOME": ""})
    assert proc.returncode == 0, proc.stderr
    assert (Path(home["HOME"]) / ".config" / "snakemake" / "slurm").is_symlink()
