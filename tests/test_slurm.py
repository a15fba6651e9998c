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
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mofo.config import REPO_ROOT
from tests.cluster import pipeline
from tests.cluster.slurm import LocalSlurm, local_profile

pytestmark = pytest.mark.slurm

PROFILE = REPO_ROOT / "profiles" / "slurm"
PROBE = REPO_ROOT / "tests" / "cluster" / "dist_probe.py"


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
    gpu_rules = {"pretrain", "finetune", "evaluate"}
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
REPO = config["repo"]
SHARDS = ["shard-0000", "shard-0001"]

rule all:
    input:
        expand("out/decode/{shard}.txt", shard=SHARDS),
        "out/pretrain/done.txt",
        "out/finetune/done.txt",

rule decode:  # a CPU shard job
    output: "out/decode/{shard}.txt"
    shell: "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK threads={threads} > {output}"

rule pretrain:  # GPU job: one task with resources.gpu GPUs, torchrun starts one process each
    output: "out/pretrain/done.txt"
    log: "logs/pretrain.log"
    shell:
        "echo $SLURM_JOB_ID >> out/pretrain/starts.txt; "
        "torchrun --standalone --nproc-per-node={resources.gpu} {REPO}/tests/cluster/dist_probe.py "
        "out/pretrain > {log} 2>&1 && touch {output}"

rule finetune:  # the several-nodes path: srun starts one task per GPU, SLURM gives the ranks
    output: "out/finetune/done.txt"
    log: "logs/finetune.log"
    shell:
        # Snakemake's job step keeps only SLURM_JOB_ID of the SLURM variables; srun gives each
        # task SLURM_JOB_NODELIST again, so the first host is looked up inside the task.
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); "
        "{resources.mpi} --ntasks-per-node={resources.tasks_per_node} --kill-on-bad-exit=1 "
        "bash -c 'MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) "
        "exec python3 {REPO}/tests/cluster/dist_probe.py out/finetune' > {log} 2>&1 "
        "&& touch {output}"
"""


def read_ranks(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def test_profile_runs_cpu_and_gpu_rules_through_slurm(slurm_cluster, tmp_path):
    """decode shards as CPU jobs; pretrain as ONE job with 2 GPUs running torchrun with 2
    processes; finetune on the several-nodes path (srun, one task per GPU) on our one node."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    profile = local_profile(
        PROFILE,
        tmp_path / "profile",
        slurm_cluster,
        extra={"retries": 0},
        resources={
            "pretrain": {"gpu": 2},
            "finetune": {
                "gpu": None,
                "cpus_per_gpu": None,
                "nodes": 1,
                "gres": "gpu:2",
                "tasks_per_node": 2,
                "mpi": "srun",
                "cpus_per_task": 1,
            },
        },
    )
    work = tmp_path / "work"
    proc = snakemake(
        slurm_cluster,
        [
            "--profile",
            str(profile),
            "-s",
            str(tmp_path / "Snakefile"),
            "-d",
            str(work),
            "--config",
            f"repo={REPO_ROOT}",
        ],
    )
    assert_ok(proc)

    for shard in ("shard-0000", "shard-0001"):
        fields = dict(
            kv.split("=") for kv in (work / f"out/decode/{shard}.txt").read_text().split()
        )
        assert fields["job"], "decode did not run inside a SLURM job"
        assert fields["cpus"] == fields["threads"]
    assert len(run_jobs(slurm_cluster, work, "decode")) == 2

    # One task with both GPUs (plugin >= 2.7.1), not the script started once per GPU.
    starts = (work / "out/pretrain/starts.txt").read_text().split()
    assert len(starts) == 1
    assert "TresPerJob=gres:gpu:2" in slurm_cluster.job_info(int(starts[0]))
    ranks = read_ranks(work / "out/pretrain")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["source"] == "torchrun" and r["world_size"] == 2 for r in ranks)
    assert all(r["all_reduce_sum"] == 3.0 for r in ranks)
    assert all(r["cuda_visible_devices"] == "0,1" for r in ranks)

    ranks = read_ranks(work / "out/finetune")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["source"] == "slurm" and r["world_size"] == 2 for r in ranks)
    assert all(r["all_reduce_sum"] == 3.0 for r in ranks)
    assert ranks[0]["master_addr"] == slurm_cluster.nodename

    for rule in ("decode", "pretrain", "finetune"):
        jobs = run_jobs(slurm_cluster, work, rule)
        assert jobs and all(j["state"] == "COMPLETED" for j in jobs), jobs


WORKER = """
import json, os, signal, sys, time
out, ckpt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
delay = float(os.environ.get("WORKER_DELAY", "0.25"))
start = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
print(f"starting at step {start}", flush=True)
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
for step in range(start, steps):
    if stop:
        json.dump({"step": step}, open(ckpt + ".tmp", "w"))
        os.replace(ckpt + ".tmp", ckpt)
        print(f"signal {stop[0]} at step {step}: checkpoint written", flush=True)
        sys.exit(75)
    time.sleep(delay)
open(out, "w").write(f"resumed_from={start}\\n")
"""

PREEMPT_SNAKEFILE = """
rule pretrain:
    output: "out/pretrain.txt"
    log: "logs/pretrain.log"
    shell: "python3 worker.py {output} ckpt.json 600 >> {log} 2>&1"
"""


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_rerun_resumes(slurm_cluster, tmp_path):
    """The profile's --signal=USR1@<s> reaches the training process inside the job step
    before the time limit; the rerun continues from the checkpoint, not from step 0."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "worker.py").write_text(WORKER)
    (tmp_path / "Snakefile").write_text(PREEMPT_SNAKEFILE)
    # 2 minute limit, signal 80 s before it: SLURM checks limits every ~30 s, so the signal
    # comes 40-70 s into the job -- after Snakemake inside the job has started the worker even
    # on a loaded machine (at 10-40 s it could hit Snakemake itself) -- and the worker would
    # need 150 s.
    short = local_profile(
        PROFILE,
        tmp_path / "short",
        slurm_cluster,
        resources={"pretrain": {"runtime": 2, "slurm_extra": "'--signal=USR1@80'"}},
        extra={"retries": 0},
    )
    base = ["-s", str(tmp_path / "Snakefile"), "-d", str(work)]
    first = snakemake(slurm_cluster, ["--profile", str(short), *base], timeout=360)
    assert first.returncode != 0, "the job should have been stopped by the time-limit signal"
    log = (work / "logs/pretrain.log").read_text()
    assert "checkpoint written" in log, log
    step = json.loads((work / "ckpt.json").read_text())["step"]
    assert step > 0
    assert not (work / "out/pretrain.txt").exists()

    full = local_profile(PROFILE, tmp_path / "full", slurm_cluster, extra={"retries": 0})
    second = snakemake(
        slurm_cluster, ["--profile", str(full), *base], timeout=240, env={"WORKER_DELAY": "0.001"}
    )
    assert_ok(second)
    assert (work / "out/pretrain.txt").read_text().strip() == f"resumed_from={step}"
    assert f"starting at step {step}" in (work / "logs/pretrain.log").read_text()


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
    """The same pipeline with ``snakemake --profile profiles/slurm`` (fitted to the node), on
    the local run's demo videos: libx264 through PyAV 18 does not give the same bytes for the
    same frames in two processes (seen here for ~1 clip in 8), so each run generating its own
    videos would compare two inputs, not SLURM with local. The demo_data job is therefore not
    submitted here; the other rules are."""
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
    submitted = PIPELINE_RULES - CHAIN_RULES - {"demo_data"}  # the demo videos are the local run's
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
    train_metrics = sorted(p.relative_to(local_res) for p in local_res.glob("*/*/metrics.jsonl"))
    eval_metrics = sorted(p.relative_to(local_res) for p in local_res.glob("eval/*/metrics.json"))
    assert {p.parts[0] for p in train_metrics} == {"pretrain", "finetune"}, train_metrics
    assert eval_metrics, "the local run wrote no evaluation metrics"
    assert train_metrics == sorted(
        p.relative_to(slurm_res) for p in slurm_res.glob("*/*/metrics.jsonl")
    )
    assert eval_metrics == sorted(
        p.relative_to(slurm_res) for p in slurm_res.glob("eval/*/metrics.json")
    )
    for metrics in sorted(local_res.glob("*/*/metrics.jsonl")):
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
    for metrics in sorted(local_res.glob("eval/*/metrics.json")):
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
    target = "results/demo/pretrain/tube/checkpoint.pt"
    out_dir = work / "results/demo/pretrain/tube"
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
            job = wait_for_training_steps(slurm_cluster, before, metrics, steps=5)
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
    log = (work / "results/demo/logs/pretrain/tube.log").read_text()
    assert f"resuming from {out_dir.relative_to(work) / 'checkpoint-last.pt'} at epoch" in log, log[
        -3000:
    ]
    assert f"step {marker['step']}" in log
    steps = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    step_ids = [r["step"] for r in steps if r.get("type") == "step"]
    assert step_ids == sorted(set(step_ids)), "steps repeated after the resume"
    assert step_ids[-1] == EPOCHS * 3  # 12 clips / batch 4 = 3 steps per epoch, all done


def wait_for_training_steps(
    cluster: LocalSlurm, old_jobs: set, metrics: Path, steps: int, timeout: float = 600
) -> str:
    """The id of the new running pretrain job once its metrics file has ``steps`` step records."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
