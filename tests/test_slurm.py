"""The SLURM profile on a real one-node SLURM cluster (marker ``slurm``; needs root).

The cluster (tests/cluster/slurm.py, fixture ``slurm_cluster``) has 2 fake GPUs; GPU rules
request them while their work runs on the CPU. Snakemake is always called through
``timeout -s INT`` so a stuck status query cannot hang the test session. The profile used is
profiles/slurm/config.yaml fitted to the local node by ``local_profile`` (partition, no
account, squeue status, CPUs/memory capped).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mofo.config import REPO_ROOT
from tests.cluster import pipeline
from tests.cluster.slurm import LocalSlurm, local_profile

pytestmark = pytest.mark.slurm

PROFILE = REPO_ROOT / "profiles" / "slurm"
#: The tube pretraining of seed 0 (config `seeds: [0]`): its folder, checkpoint and log.
PRETRAIN_DIR = "results/demo/pretrain/tube/s0"
PRETRAIN_TARGET = f"{PRETRAIN_DIR}/checkpoint.pt"
PRETRAIN_LOG = "results/demo/logs/pretrain/tube-s0.log"


def snakemake(
    cluster: LocalSlurm, args: list[str], timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run snakemake under ``timeout -s INT`` against ``cluster``; output captured."""
    cmd = ["timeout", "-s", "INT", str(timeout), sys.executable, "-m", "snakemake", *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=cluster.env({**os.environ, **(env or {})}),
        check=False,
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{proc.stderr[-6000:]}"


def rule_jobs(cluster: LocalSlurm, rule: str) -> list[dict]:
    """Jobs the controller ran for ``rule`` (the plugin puts rule_<name>... in the comment),
    from every test: the cluster is shared by the session. See :func:`run_jobs`."""
    return [j for j in cluster.jobs() if j["comment"].startswith(f"rule_{rule}")]


def run_job_ids(work: Path, rule: str | None = None) -> set[str]:
    """Ids of the SLURM jobs one Snakemake run in ``work`` submitted: its SLURM logs are
    ``.snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log``."""
    logs = work / ".snakemake" / "slurm_logs"
    folder = logs / f"rule_{rule}" if rule else logs
    return {p.stem for p in folder.rglob("*.log")}


def run_jobs(cluster: LocalSlurm, work: Path, rule: str) -> list[dict]:
    """The jobs for ``rule`` of the Snakemake run in ``work`` only, not other tests' jobs
    (counts and "all COMPLETED" checks must not depend on which tests ran before)."""
    ours = run_job_ids(work, rule)
    assert ours, f"no SLURM log of rule {rule} under {work}"
    return [j for j in rule_jobs(cluster, rule) if j["id"] in ours]


def test_cluster_runs_cpu_and_gpu_jobs(slurm_cluster, tmp_path):
    cpu = slurm_cluster.sbatch(f"--output={tmp_path}/cpu.out", "--wrap", "echo cpu $SLURM_JOB_ID")
    gpu = slurm_cluster.sbatch(
        "--gpus=2", f"--output={tmp_path}/gpu.out", "--wrap", "echo gpus=$CUDA_VISIBLE_DEVICES"
    )
    assert slurm_cluster.wait_job(cpu) == "COMPLETED"
    assert slurm_cluster.wait_job(gpu) == "COMPLETED"
    assert (tmp_path / "cpu.out").read_text().strip() == f"cpu {cpu}"
    assert (tmp_path / "gpu.out").read_text().strip() == "gpus=0,1"


def test_profile_fields_the_issue_asks_for():
    """Static check of the real profile (the cluster run below checks they work)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    res = profile["set-resources"]
    for rule in ("decode", "optical_flow", "motion_map", "motion_boxes"):
        assert {"cpus_per_task", "mem_mb", "runtime"} <= set(res[rule]), rule
        assert "gpu" not in res[rule]
    for rule in ("pretrain", "finetune", "evaluate"):
        assert {"gpu", "cpus_per_gpu", "mem_mb", "runtime"} <= set(res[rule]), rule
    for rule in ("pretrain", "finetune"):
        assert "--signal=USR1@" in res[rule]["slurm_extra"]
    # cpus_per_task in the defaults would override cpus_per_gpu for every GPU job.
    assert "cpus_per_task" not in profile["default-resources"]


def test_profile_threads_equal_the_cpus_each_job_requests():
    """README/profile claim: fine-tuning and evaluation ask for GPUs (--gpus, --cpus-per-gpu)
    like pretraining, and set-threads equals gpus x cpus per GPU (GPU rules) or cpus_per_task
    (CPU rules), so {threads} matches what SLURM gives the job."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    res, threads = profile["set-resources"], profile["set-threads"]
    gpu_rules = {"pretrain", "finetune", "evaluate", "features"}
    for rule in sorted(gpu_rules):
        gpus, cpus = res[rule]["gpu"], res[rule]["cpus_per_gpu"]
        assert isinstance(gpus, int) and gpus >= 1, (rule, gpus)
        assert isinstance(cpus, int) and cpus >= 1, (rule, cpus)
        assert "cpus_per_task" not in res[rule], rule
        assert threads[rule] == gpus * cpus, (rule, threads[rule], gpus, cpus)
    for rule, n in threads.items():
        if rule not in gpu_rules:
            assert n == res[rule]["cpus_per_task"], (rule, n, res[rule])


SNAKEFILE = """
rule all:
    input: expand("out/decode/{shard}.txt", shard=["shard-0000", "shard-0001"])

rule decode:  # a CPU shard job
    output: "out/decode/{shard}.txt"
    shell: "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK threads={threads} > {output}"
"""


def test_profile_runs_cpu_rules_through_slurm(slurm_cluster, tmp_path):
    """Shard rules become CPU jobs whose {threads} equal the CPUs SLURM gave them. (The GPU
    rules are run for real below: the pretrain rule with 2 GPUs, the several-node launch.)"""
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    profile = local_profile(PROFILE, tmp_path / "profile", slurm_cluster, extra={"retries": 0})
    work = tmp_path / "work"
    proc = snakemake(
        slurm_cluster,
        ["--profile", str(profile), "-s", str(tmp_path / "Snakefile"), "-d", str(work)],
    )
    assert_ok(proc)
    for shard in ("shard-0000", "shard-0001"):
        fields = dict(
            kv.split("=") for kv in (work / f"out/decode/{shard}.txt").read_text().split()
        )
        assert fields["job"], "decode did not run inside a SLURM job"
        assert fields["cpus"] == fields["threads"]
    jobs = run_jobs(slurm_cluster, work, "decode")
    assert len(jobs) == 2 and all(j["state"] == "COMPLETED" for j in jobs), jobs


@pytest.mark.mlflow
def test_tracking_from_slurm_jobs_to_a_server(slurm_cluster, mlflow_tracking_server, tmp_path):
    """Parent run made by the submitting process, child runs made inside the SLURM jobs
    (environment passed by sbatch --export=ALL), all nested under the one parent."""
    from tests.test_mlflow import check_tracked_workflow, write_workflow

    folder = write_workflow(tmp_path / "wf", "from-slurm")
    profile = local_profile(PROFILE, tmp_path / "profile", slurm_cluster, extra={"retries": 0})
    proc = snakemake(
        slurm_cluster,
        ["--profile", str(profile), "-d", str(folder), "-s", str(folder / "Snakefile")],
        env={
            "MLFLOW_TRACKING_URI": mlflow_tracking_server.uri,
            "MOFO_MLFLOW_PARENT_RUN_ID": "",
            "MOFO_INVOCATION_ID": "",
        },
    )
    assert_ok(proc)
    runs = check_tracked_workflow(mlflow_tracking_server.client(), folder, "from-slurm")
    jobs = run_jobs(slurm_cluster, folder, "decode") + run_jobs(slurm_cluster, folder, "pretrain")
    slurm_ids = {j["id"] for j in jobs}
    for name in ("decode-shard-0000", "decode-shard-0001", "pretrain"):
        assert runs[name].data.tags["slurm.job_id"] in slurm_ids
    parent = next(r for n, r in runs.items() if n.startswith("workflow-"))
    slurm_logs = mlflow_tracking_server.client().list_artifacts(parent.info.run_id, "slurm_logs")
    assert slurm_logs, "the SLURM job logs were not uploaded to the parent run"


# ---------------------------------------------------------------------------------------------
# The real pipeline on the tiny config (.test/config/tiny.yaml), through SLURM and locally.

SNAKEFILE_MAIN = pipeline.SNAKEFILE
PIPELINE_RULES = pipeline.PIPELINE_RULES
pipeline_workdir = pipeline.workdir
pipeline_args = pipeline.args


def clean_env() -> dict[str, str]:
    """No tracking server or parent run leaking in from the test process."""
    return {var: "" for var in pipeline.TRACKING_VARS}


@pytest.fixture(scope="module")
def local_reference(tiny_local_pipeline) -> Path:
    """The tiny pipeline run with the local executor: what the SLURM run must reproduce."""
    return tiny_local_pipeline


@pytest.fixture(scope="module")
def slurm_pipeline(
    slurm_cluster, local_reference, tmp_path_factory
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The same pipeline with ``snakemake --profile <profiles/slurm fitted to the node>`` (a
    copy given by path, not the README's name ``slurm``), on the local run's demo videos:
    libx264 through PyAV 18 does not give the same bytes for the same frames in two processes
    (seen here for ~1 clip in 8), so each run generating its own videos would compare two
    inputs, not SLURM with local. The demo_data job is therefore not submitted here; the other
    rules are."""
    base = tmp_path_factory.mktemp("slurm-pipeline")
    profile = local_profile(PROFILE, base / "profile", slurm_cluster, extra={"retries": 0})
    work = pipeline_workdir(base / "work")
    shutil.copytree(local_reference / "data" / "demo", work / "data" / "demo")
    proc = snakemake(
        slurm_cluster,
        ["--profile", str(profile), *pipeline_args(work)],
        timeout=1200,
        env=clean_env(),
    )
    assert_ok(proc)
    return work, profile, proc


def test_profile_covers_every_pipeline_rule():
    """Each rule that becomes a SLURM job has its resources in the profile (a new rule needs
    one); the Snakefile's localrules (targets, the report's plotting) run in Snakemake itself."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert PIPELINE_RULES <= set(profile["set-resources"])
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--list-rules", "-s", str(SNAKEFILE_MAIN),
         "-d", str(REPO_ROOT)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # one rule per line; a long docstring continues on indented lines
    rules = {line.split()[0] for line in out.stdout.splitlines() if line[:1].strip()}
    local = re.search(r"^localrules:\n((?:    \w+,?\n)+)", SNAKEFILE_MAIN.read_text(), re.M)
    assert local, "the Snakefile declares its localrules"
    local_rules = set(re.findall(r"\w+", local.group(1)))
    assert {"all", "motion"} <= local_rules
    assert rules - local_rules == PIPELINE_RULES, (
        f"rules without profile resources: {rules - local_rules - PIPELINE_RULES}"
    )


# One SLURM job per shard runs its whole motion chain (Snakemake group "motion_chain").
CHAIN_RULES = {"decode", "optical_flow", "motion_map", "motion_boxes", "motion_pictures"}


def test_pipeline_jobs_went_through_slurm(slurm_cluster, slurm_pipeline):
    work, _, _ = slurm_pipeline
    logs = work / ".snakemake" / "slurm_logs"
    # The demo videos are the local run's; trajectories run only for MME pretrainings (none here).
    submitted = PIPELINE_RULES - CHAIN_RULES - {"demo_data", "trajectories"}
    assert {p.name.removeprefix("rule_") for p in logs.glob("rule_*")} == submitted
    # This run's jobs: its SLURM logs are named by job id (other tests' jobs share the cluster).
    by_rule = {rule: run_jobs(slurm_cluster, work, rule) for rule in submitted}
    for rule, jobs in by_rule.items():
        assert jobs, f"no SLURM job for {rule}"
        assert all(j["state"] == "COMPLETED" for j in jobs), (rule, jobs)
    chain_ids = {p.stem for p in logs.glob("group_motion_chain*/**/*.log")}
    chain = [j for j in slurm_cluster.jobs() if j["id"] in chain_ids]
    n_shards = len(list((work / "results/demo/frames").glob("*.jpgpack")))
    assert len(chain_ids) == len(chain) == n_shards, (chain_ids, chain)
    assert all(j["state"] == "COMPLETED" for j in chain), chain
    # GPU stages asked for the (fake) GPU and CPUs per GPU (--gpus=1 --cpus-per-gpu=1 with the
    # local profile); CPU stages did not.
    for rule in ("pretrain", "finetune", "evaluate"):
        for job in by_rule[rule]:
            fields = slurm_cluster.job_info(int(job["id"])).split()
            assert "TresPerJob=gres:gpu:1" in fields, (rule, fields)
            assert "CpusPerTres=gres:gpu:1" in fields, (rule, fields)
    assert "gpu" not in slurm_cluster.job_info(int(chain[0]["id"]))


def test_slurm_results_equal_local_results(slurm_pipeline, local_reference):
    work, _, _ = slurm_pipeline
    slurm_res, local_res = work / "results" / "demo", local_reference / "results" / "demo"
    # Preprocessing is deterministic: the files are identical, byte for byte.
    boxes = sorted(p.relative_to(local_res) for p in (local_res / "boxes").glob("*.csv"))
    assert boxes
    for rel in [Path("manifest.csv"), *boxes]:
        assert (slurm_res / rel).read_bytes() == (local_res / rel).read_bytes(), rel
    assert json.loads((slurm_res / "motion/box_quality.json").read_text()) == json.loads(
        (local_res / "motion/box_quality.json").read_text()
    )
    # Training on the CPU with the same seeds and thread count: same losses, same accuracies.
    # Both runs have the same metric files (else the loops below could compare nothing).
    train_metrics = sorted(p.relative_to(local_res) for p in local_res.glob("*/*/s*/metrics.jsonl"))
    eval_metrics = sorted(p.relative_to(local_res) for p in local_res.glob("eval/*/s*/metrics.json"))
    assert {p.parts[0] for p in train_metrics} == {"pretrain", "finetune"}, train_metrics
    assert eval_metrics, "the local run wrote no evaluation metrics"
    assert train_metrics == sorted(
        p.relative_to(slurm_res) for p in slurm_res.glob("*/*/s*/metrics.jsonl")
    )
    assert eval_metrics == sorted(
        p.relative_to(slurm_res) for p in slurm_res.glob("eval/*/s*/metrics.json")
    )
    for metrics in sorted(local_res.glob("*/*/s*/metrics.jsonl")):
        rel = metrics.relative_to(local_res)
        ours = [json.loads(x) for x in (slurm_res / rel).read_text().splitlines()]
        ref = [json.loads(x) for x in metrics.read_text().splitlines()]
        steps = [r for r in ours if r.get("type") == "step"]
        ref_steps = [r for r in ref if r.get("type") == "step"]
        assert steps, rel
        assert [r["step"] for r in steps] == [r["step"] for r in ref_steps], rel
        # approx() compares flat lists of numbers only (tuples inside are compared with ==)
        assert [r["loss"] for r in steps] == pytest.approx(
            [r["loss"] for r in ref_steps], rel=1e-5
        ), rel
    for metrics in sorted(local_res.glob("eval/*/s*/metrics.json")):
        rel = metrics.relative_to(local_res)
        ours, ref = json.loads((slurm_res / rel).read_text()), json.loads(metrics.read_text())
        assert {"top1", "top5"} <= ref.keys() and {"top1", "top5"} <= ours.keys(), rel
        for key in ("top1", "top5"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-9), (rel, key)
    assert (slurm_res / "table.csv").exists()


EPOCHS = 30  # for the preemption test: 90 steps, long enough to signal mid-run


@pytest.mark.slow
def test_preempted_training_resumes_from_checkpoint(slurm_cluster, slurm_pipeline, tmp_path):
    """SIGUSR1 to a running pretraining job (what --signal=USR1@<s> sends before the time
    limit): training checkpoints and the job fails; the rerun resumes at that step.

    Works on its own copy of the pipeline's directory (it retrains and rewrites the metrics):
    the other tests of the module read the shared one, whichever order they run in."""
    shared, profile, _ = slurm_pipeline
    work = tmp_path / "work"
    # symlinks=True keeps config/ a link to the repository's; copy2 keeps the mtimes, so
    # Snakemake sees the same up-to-date outputs as in the shared directory.
    shutil.copytree(shared, work, symlinks=True)
    shutil.rmtree(work / ".snakemake" / "slurm_logs")  # the copy's logs are the new jobs'
    longer = tmp_path / "longer.yaml"  # long enough to be caught mid-run
    longer.write_text(yaml.safe_dump({"pretrain": {"epochs": EPOCHS}}))
    target = PRETRAIN_TARGET
    out_dir = work / PRETRAIN_DIR
    metrics = out_dir / "metrics.jsonl"
    metrics.unlink()  # the earlier run's; the new job's file is what we watch
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        str(profile),
        *pipeline_args(work, longer),
        "--",
        target,
    ]
    env = slurm_cluster.env({**os.environ, **clean_env()})
    before = {j["id"] for j in rule_jobs(slurm_cluster, "pretrain")}
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as fh:
        # Own process group, so the whole Snakemake tree can be interrupted if the test fails.
        first = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            job = wait_for_training_steps(slurm_cluster, before, metrics, steps=5, proc=first)
            slurm_cluster.run("scancel", "--signal=USR1", job)
            first.wait(timeout=600)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGINT)
                first.wait(timeout=60)
    output = first_log.read_text()
    assert first.returncode != 0, output[-3000:]
    marker = json.loads((out_dir / "requeue.json").read_text())
    assert marker["step"] >= 5
    assert (out_dir / "checkpoint-last.pt").exists()

    second = subprocess.run(
        ["timeout", "-s", "INT", "900", *cmd], capture_output=True, text=True, env=env, check=False
    )
    assert second.returncode == 0, second.stderr[-5000:]
    log = (work / PRETRAIN_LOG).read_text()
    # Snakemake removes a job's log before it runs: this log is the rerun's own.
    last = out_dir.relative_to(work) / "checkpoint-last.pt"
    resumed = re.findall(rf"resuming from {re.escape(str(last))} at epoch (\d+), step (\d+)", log)
    assert resumed == [(str((marker["step"] - 1) // 3), str(marker["step"]))], log[-3000:]
    assert trained_epochs(log) == list(range((marker["step"] - 1) // 3, EPOCHS)), log[-3000:]
    # Every step exactly once, none missing: the interrupted run's steps up to the checkpoint,
    # then the rerun's (12 clips / batch 4 = 3 steps per epoch, all epochs done).
    step_ids = step_records(out_dir / "metrics.jsonl")
    assert step_ids == list(range(1, EPOCHS * 3 + 1)), step_ids


def wait_for_training_steps(
    cluster: LocalSlurm, old_jobs: set, metrics: Path, steps: int, timeout: float = 600,
    proc: subprocess.Popen | None = None,
) -> str:
    """The id of the new running pretrain job once its metrics file has ``steps`` step records
    (an error as soon as ``proc``, the Snakemake that submits it, has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"snakemake exited ({proc.returncode}) before training began")
        jobs = [j for j in rule_jobs(cluster, "pretrain") if j["id"] not in old_jobs]
        running = [j for j in jobs if j["state"] == "RUNNING"]
        if running and metrics.exists():
            records = [x for x in metrics.read_text().splitlines() if '"type": "step"' in x]
            if len(records) >= steps:
                return running[0]["id"]
        if jobs and not running and all(j["state"] != "PENDING" for j in jobs):
            raise AssertionError(f"pretrain job ended before it could be signalled: {jobs}")
        time.sleep(0.5)
    raise AssertionError("pretraining did not start in time")


# ---------------------------------------------------------------------------------------------
# The training rules' launch and preemption paths, for real: rules/training.smk through the
# profile, mofo.stages.stage_command's srun line, the warning signal (as SLURM records it at
# submission, and sent by the test).

def copy_pipeline(shared: Path, work: Path) -> Path:
    """A private copy of the SLURM pipeline's directory, for a test that retrains in it.

    symlinks=True keeps config/ a link to the repository's; copy2 keeps the mtimes, so
    Snakemake sees the same up-to-date outputs as in the shared directory. The copy's
    slurm_logs are removed: the logs left in it are its own jobs' (see run_jobs)."""
    shutil.copytree(shared, work, symlinks=True)
    shutil.rmtree(work / ".snakemake" / "slurm_logs")
    return work


def step_records(metrics: Path) -> list[int]:
    """The global step of every ``step`` record of a metrics.jsonl, in file order."""
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [r["step"] for r in records if r.get("type") == "step"]


def rank_lines(log: str) -> set[tuple[int, int, str]]:
    """(rank, world size, source) of the engine's one line per training process."""
    found = re.findall(r"\] pretrain-tube: rank (\d+) of (\d+) \((\w+)\) on cpu", log)
    return {(int(r), int(w), source) for r, w, source in found}


def trained_epochs(log: str) -> list[int]:
    """The epochs a pretrain-tube job's own log shows progress for, sorted (its tqdm bars)."""
    return sorted({int(e) for e in re.findall(r"pretrain-tube epoch (\d+):", log)})


def train_clips(work: Path) -> int:
    manifest = (work / "results/demo/manifest.csv").read_text().splitlines()
    header = manifest[0].split(",")
    split = header.index("split")
    return sum(1 for row in manifest[1:] if row.split(",")[split] == "train")


def test_pretrain_rule_with_two_gpus_trains_two_ranks(slurm_cluster, slurm_pipeline, tmp_path):
    """The real pretrain rule (rules/training.smk) through the profile with ``gpu: 2``: one
    job, one task holding both GPUs; ``processes_per_job`` makes it 2 processes, so the stage
    runs under ``torchrun --standalone --nproc-per-node=2`` and both ranks train.

    Fake GPUs: the local node declares ``Gres=gpu:2`` backed by two character devices
    (tests/cluster/slurm.py), so ``gpu: 2`` schedules exactly as on a GPU cluster (--gpus=2,
    CUDA_VISIBLE_DEVICES=0,1); torch finds no CUDA there, and the two processes train on the
    CPU over gloo. Nothing else is overridden: the rule reads ``resources.gpu`` as on a cluster."""
    shared, _, _ = slurm_pipeline
    work = copy_pipeline(shared, tmp_path / "work")
    profile = local_profile(
        PROFILE, tmp_path / "profile", slurm_cluster, extra={"retries": 0},
        resources={"pretrain": {"gpu": 2}},
    )
    proc = snakemake(
        slurm_cluster,
        ["--profile", str(profile), *pipeline_args(work), "--forcerun", "pretrain", "--",
         PRETRAIN_TARGET],
        env=clean_env(),
    )
    assert_ok(proc)
    [job] = run_jobs(slurm_cluster, work, "pretrain")
    assert job["state"] == "COMPLETED", job
    assert "TresPerJob=gres:gpu:2" in slurm_cluster.job_info(int(job["id"])).split()
    log = (work / PRETRAIN_LOG).read_text()
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m mofo.training.pretrain" in log
    assert rank_lines(log) == {(0, 2, "torchrun"), (1, 2, "torchrun")}, log[-3000:]
    # The tiny config's total batch of 4 clips over 2 processes: 2 clips per rank and step
    # (DistributedSampler gives each rank half of the clips), so an epoch has the steps of
    # one process.
    assert "pretrain-tube: total batch 4 = 2 clips x 2 processes x 1 accumulation" in log
    steps_per_epoch = train_clips(work) // 2 // 2
    assert steps_per_epoch >= 1
    assert step_records(work / PRETRAIN_DIR / "metrics.jsonl") == list(
        range(1, 2 * steps_per_epoch + 1)  # tiny config: 2 epochs
    )


def test_several_node_launch_line_trains_with_srun_tasks(slurm_cluster, slurm_pipeline, tmp_path):
    """The command line ``mofo.stages.stage_command`` builds for a several-node job (srun, one
    task per GPU, ranks from SLURM_PROCID / SLURM_NTASKS, MASTER_ADDR looked up in the task),
    run as the batch step of a job with 2 tasks on our one node: both ranks train together.
    The only change to the line is ``--nodes=1``: this cluster has one node."""
    from mofo.config import load_config
    from mofo.stages import stage_command, write_stage_config

    shared, _, _ = slurm_pipeline
    results = shared / "results/demo"
    out = tmp_path / "pretrain"
    config = write_stage_config(load_config([pipeline.TINY]), out)
    cmd = stage_command(
        "mofo.training.pretrain",
        ["--config", str(config), "--masking", "tube", "--manifest", str(results / "manifest.csv"),
         "--results-dir", str(results), "--out", str(out)],
        nproc=2, nodes=2,
    )
    assert cmd[:3] == ["srun", "--nodes=2", "--ntasks-per-node=2"], cmd
    cmd[1] = "--nodes=1"
    job = slurm_cluster.sbatch(
        "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=gpu:2",
        f"--chdir={tmp_path}", f"--output={tmp_path / 'job.log'}", "--wrap", shlex.join(cmd),
    )
    state = slurm_cluster.wait_job(job, timeout=600)
    log = (tmp_path / "job.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert rank_lines(log) == {(0, 2, "slurm"), (1, 2, "slurm")}, log[-3000:]
    assert (out / "checkpoint.pt").exists()
    steps_per_epoch = train_clips(shared) // 2 // 2  # total batch 4 = 2 clips x 2 ranks
    assert step_records(out / "metrics.jsonl") == list(range(1, 2 * steps_per_epoch + 1))


#: The profile's warning signal before the time limit: ``--signal=USR1@<lead>`` (``B:`` would
#: signal the batch shell only; the test below expects SLURM to have recorded none).
PROFILE_SIGNAL = re.compile(r"--signal=(?:B:)?USR1@(\d+)")

#: One job after the other: the controller logs concurrent submissions interleaved.
SIGNAL_SNAKEFILE = """
rule all:
    input: "out/evaluate.txt"

rule pretrain:
    output: "out/pretrain.txt"
    shell: "echo $SLURM_JOB_ID > {output}"

rule finetune:
    input: "out/pretrain.txt"
    output: "out/finetune.txt"
    shell: "echo $SLURM_JOB_ID > {output}"

rule evaluate:  # a GPU rule without the warning signal
    input: "out/finetune.txt"
    output: "out/evaluate.txt"
    shell: "echo $SLURM_JOB_ID > {output}"
"""


def submitted_signals(cluster: LocalSlurm, since: int) -> dict[str, str]:
    """Job id -> the warning signal the controller recorded for the job when it was submitted
    (``<signal number>@<seconds>``, ``B:`` first for the batch shell only), from the job
    descriptors slurmctld logs at debug3 from byte ``since`` of its log, submissions one at a
    time. ``scontrol show job`` does not show the setting on SLURM 22.05 (nor does
    ``squeue --json``)."""
    text = cluster.ctld_log.read_bytes()[since:].decode(errors="replace")
    found, current = {}, None
    for line in text.splitlines():
        if "JobDesc:" in line:
            current = None
        elif (m := re.search(r"end_time=\S* signal=(\S+)", line)) is not None:
            current = m[1]
        elif (m := re.search(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", line)) is not None:
            found[m[1]] = current
    return found


@pytest.mark.slow
def test_profile_asks_slurm_for_usr1_before_the_time_limit(slurm_cluster, tmp_path):
    """The profile's ``slurm_extra: '--signal=USR1@600'`` of pretrain and finetune reaches
    SLURM with each job as USR1, 600 s, to the job steps (no ``B:``); evaluate has none. Read
    from what the controller itself recorded at submission (its debug3 job descriptor), for
    the jobs of one ``snakemake --profile`` run. What SLURM then does with the setting (USR1 to
    every job step ``lead`` seconds before the limit) is what ``scancel --signal=USR1 <job>``
    does, which the preemption test below sends."""
    profile_cfg = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    leads = {rule: PROFILE_SIGNAL.search(profile_cfg[rule]["slurm_extra"])
             for rule in ("pretrain", "finetune")}
    assert all(leads.values()), profile_cfg
    (tmp_path / "Snakefile").write_text(SIGNAL_SNAKEFILE)
    profile = local_profile(PROFILE, tmp_path / "profile", slurm_cluster, extra={"retries": 0})
    work = tmp_path / "work"
    since = slurm_cluster.ctld_log.stat().st_size
    slurm_cluster.run("scontrol", "setdebug", "debug3")
    try:
        proc = snakemake(
            slurm_cluster,
            ["--profile", str(profile), "-s", str(tmp_path / "Snakefile"), "-d", str(work)],
        )
    finally:
        slurm_cluster.run("scontrol", "setdebug", "info")
    assert_ok(proc)
    signals = submitted_signals(slurm_cluster, since)
    usr1 = int(signal.SIGUSR1)
    for rule, lead in leads.items():
        [job] = run_jobs(slurm_cluster, work, rule)
        assert job["state"] == "COMPLETED", job
        assert signals.get(job["id"]) == f"{usr1}@{lead[1]}", (rule, job["id"], signals)
    [job] = run_jobs(slurm_cluster, work, "evaluate")
    assert signals.get(job["id"]) == "0@0", (job["id"], signals)


#: Long enough that the pretraining is still running when the test signals it after 3 steps
#: (3 steps per epoch): the signal comes within a second, the last step ~10 s later.
PREEMPT_EPOCHS = 30


def wait_for_queued_retry(cluster: LocalSlurm, first: str, old_jobs: set, marker: Path,
                          proc: subprocess.Popen, timeout: float = 600) -> tuple[list, dict]:
    """The pretrain jobs submitted after ``first`` and the requeue marker it left, once
    ``first`` has ended, its retry is queued and the marker parses (training writes it after
    checkpoint-last.pt, and nothing after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"snakemake exited ({proc.returncode}) without a retry")
        jobs = [j for j in rule_jobs(cluster, "pretrain") if j["id"] not in old_jobs]
        ended = any(j["id"] == first and j["state"] not in ("RUNNING", "COMPLETING")
                    for j in jobs)
        retries = [j for j in jobs if j["id"] != first]
        if ended and retries and marker.exists():
            try:
                return retries, json.loads(marker.read_text())
            except json.JSONDecodeError:
                pass  # being written
        time.sleep(0.5)
    raise AssertionError(f"no queued retry of job {first} after {timeout} s")


@pytest.mark.slow
def test_warning_signal_requeues_and_the_retry_resumes(slurm_cluster, slurm_pipeline, tmp_path):
    """docs/CLUSTER.md "Time limits and preemption", end to end in ONE ``snakemake --profile``
    run with ``retries: 1``: SIGUSR1 to the steps of a running pretraining job (``scancel
    --signal=USR1``: the processes SLURM signals for the profile's ``--signal=USR1@<lead>``,
    see the test above) makes training write checkpoint-last.pt and stop; the job fails,
    Snakemake resubmits it, and the retry resumes at the step the first job saved; the
    invocation exits 0 and no step is trained twice. The first job ends because its stage
    exited 75, not because the signal killed the job step's own Snakemake (the Snakefile has
    it ignore SIGUSR1).

    Nothing depends on timing: the test signals once the job has trained 3 steps, and the
    partition is down from before the signal until the test has read what the first job left
    (the retry waits PENDING meanwhile; it would delete the requeue marker)."""
    shared, _, _ = slurm_pipeline
    work = copy_pipeline(shared, tmp_path / "work")
    out_dir = work / PRETRAIN_DIR
    (out_dir / "metrics.jsonl").unlink()  # the earlier run's; the new job's file is watched
    (out_dir / "checkpoint.pt").unlink()  # the job to rerun
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump({"pretrain": {"epochs": PREEMPT_EPOCHS}}))
    profile = local_profile(PROFILE, tmp_path / "profile", slurm_cluster, extra={"retries": 1})
    cmd = ["timeout", "-s", "INT", "900", sys.executable, "-m", "snakemake", "--profile",
           str(profile), *pipeline_args(work, longer), "--", PRETRAIN_TARGET]
    before = {j["id"] for j in rule_jobs(slurm_cluster, "pretrain")}
    partition = f"PartitionName={slurm_cluster.partition}"
    with open(tmp_path / "snakemake.log", "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=slurm_cluster.env({**os.environ, **clean_env()}))
        try:
            first = wait_for_training_steps(
                slurm_cluster, before, out_dir / "metrics.jsonl", 3, proc=proc
            )
            slurm_cluster.run("scontrol", "update", partition, "State=DOWN")
            try:
                slurm_cluster.run("scancel", "--signal=USR1", first)
                retries, saved = wait_for_queued_retry(
                    slurm_cluster, first, before, out_dir / "requeue.json", proc
                )
                last = torch.load(out_dir / "checkpoint-last.pt", weights_only=True)
                steps_then = step_records(out_dir / "metrics.jsonl")
                first_log = (work / PRETRAIN_LOG).read_text()  # the retry deletes it
            finally:
                slurm_cluster.run("scontrol", "update", partition, "State=UP")
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=60)
    output = (tmp_path / "snakemake.log").read_text()
    assert proc.returncode == 0, output[-5000:]
    assert [j["state"] for j in retries] == ["PENDING"], retries
    total = PREEMPT_EPOCHS * 3  # 12 clips / batch 4
    step = saved["step"]
    assert 3 <= step < total, saved
    assert last["global_step"] == step, (last["global_step"], saved)
    assert steps_then == list(range(1, step + 1)), steps_then
    # The stage saved, exited 75 and was reported as a requeue; the job step's Snakemake
    # (the task srun started) outlived the signal and exited after the stage, rather than
    # being killed by it and ending the step under the training.
    assert f"checkpoint written at step {step} to " in first_log, first_log[-3000:]
    assert "checkpointed and stopped for requeue (exit 75)" in first_log, first_log[-3000:]
    [slurm_log] = (work / ".snakemake" / "slurm_logs").rglob(f"{first}.log")
    assert re.search(r"task 0: Exited with exit code \d+", slurm_log.read_text()), (
        slurm_log.read_text()[-3000:])
    jobs = sorted(run_jobs(slurm_cluster, work, "pretrain"), key=lambda j: int(j["id"]))
    assert [(j["id"], j["state"]) for j in jobs] == [
        (first, "FAILED"), (retries[0]["id"], "COMPLETED")], jobs
    # Snakemake removes a job's log before it runs: this log is the retry's own.
    log = (work / PRETRAIN_LOG).read_text()
    resumed = re.findall(r"resuming from \S+checkpoint-last\.pt at epoch (\d+), step (\d+)", log)
    assert resumed == [(str((step - 1) // 3), str(step))], log[-3000:]  # 3 steps per epoch
    # ...and it trained from there: a retry that printed that line but restarted at step 0
    # (the metrics file is reset then) left the same metrics and checkpoint behind.
    assert trained_epochs(log) == list(range((step - 1) // 3, PREEMPT_EPOCHS)), log[-3000:]
    assert step_records(out_dir / "metrics.jsonl") == list(range(1, total + 1))
    assert (out_dir / "checkpoint.pt").exists() and not (out_dir / "checkpoint-last.pt").exists()
