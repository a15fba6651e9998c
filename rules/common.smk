# Shared helpers for the rules. Everything computed here is cheap: the shard list comes
# from the annotation files (or the demo config), never from decoding video.
from mofo.data.adapters import annotation_files
from mofo.data.manifest import shard_names
from mofo.evaluation.table import RANDOM_ENCODER as RANDOM_INIT_LABEL  # the random encoder's row
from mofo.masking import needs_token_flow
from mofo.recipe.batch import TRAINING_STAGES, describe_plans, processes_per_node
from mofo.provenance import (  # a rule's rerun trigger: what its stage reads
    pretrain_stage,
    pretraining_spec,
    stage_hash,
)

RESULTS = f"{config['results_dir']}/{config['dataset']['name']}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
SHARDS = shard_names(config)
DEMO_ROOT = config["dataset"]["demo"]["root"]


wildcard_constraints:
    shard=r"shard-\d{4}",
    masking=r"[a-z]+(?:_[a-z]+)?",  # a pretraining name: <strategy> or <strategy>_<target>
    head=r"[a-z]+",
    seed=r"\d+",


def manifest_inputs(wildcards):
    """The annotation files the manifest is built from, so a changed file rebuilds it (the
    adapters own the file names; a null list split is dropped there)."""
    return annotation_files(config["dataset"])


def gt_boxes_input(wildcards):
    """Ground-truth boxes and the clip table they refer to: the demo's own, or a real
    dataset's hand-drawn ``dataset.<name>.gt_boxes`` against its manifest; [] without."""
    name = config["dataset"]["name"]
    if name == "demo":
        return [f"{DEMO_ROOT}/gt_boxes.csv", f"{DEMO_ROOT}/clips.csv"]
    gt = config["dataset"][name]["gt_boxes"]  # "" (the default) = none
    return [gt, f"{RESULTS}/manifest.csv"] if gt else []


def pooled_flow_inputs(wildcards):
    """The kept pooled flow of every shard for a pretraining whose masking follows the flow
    (mgmae, mgmae_mme); [] for the others, which never wait for it."""
    if not needs_token_flow(pretraining_spec(wildcards.masking)[0]):
        return []
    return expand(f"{RESULTS}/flow/{{shard}}.pooled.npz", shard=SHARDS)


def maybe_temp(path):
    """Flow is large: Snakemake deletes it after its consumers unless optical_flow.keep."""
    return path if config["optical_flow"]["keep"] else temp(path)


def pretrain_trajectories(wildcards):
    """MME's trajectory files for a pretraining whose name asks for target mme (tube_mme,
    mofo_mme); [] for pixel targets, so their DAG has no trajectories jobs."""
    _, target = pretraining_spec(wildcards.masking)
    return expand(f"{RESULTS}/trajectories/{{shard}}.npz", shard=SHARDS) if target == "mme" else []


def pretrain_config_hash(wildcards):
    """The pretraining's rerun trigger: what its target's stage reads (pretrain / pretrain_mme),
    with its masking strategy's own section for that strategy only (VARIANT_READS: mgmae)."""
    strategy, target = pretraining_spec(wildcards.masking)
    return stage_hash(config, pretrain_stage(target), strategy)


VARIANTS = config["variants"]
SEEDS = config["seeds"]
SCRATCH = "scratch"  # a variant's masking that means "no pretraining": fine-tuning from a random init
PRETRAININGS = sorted({v["masking"] for v in VARIANTS.values()} - {SCRATCH})


def pretrained_input(wildcards):
    """The pretrained checkpoint a fine-tuning starts from; none for the scratch variant."""
    if wildcards.masking == SCRATCH:
        return []
    return f"{RESULTS}/pretrain/{wildcards.masking}/s{wildcards.seed}/checkpoint.pt"


def table_runs():
    """One entry per variant and seed (mofo.evaluation.table.Run): the evaluation's
    metrics.json and, for pretrained variants, the pretraining's held-out reconstruction and
    the probe of its encoder; then the randomly initialised encoder's probe (a probe-only
    row, the reference of every kNN figure)."""
    runs = []
    for v in VARIANTS.values():
        for seed in SEEDS:
            pretrained = v["masking"] != SCRATCH
            runs.append({
                "variant": v["label"], "masking": v["masking"], "head": v["head"], "seed": seed,
                "metrics": f"{RESULTS}/eval/{v['masking']}-{v['head']}/s{seed}/metrics.json",
                "validation": (f"{RESULTS}/pretrain/{v['masking']}/s{seed}/validation.json"
                               if pretrained else None),
                "probe": (f"{RESULTS}/probe/{v['masking']}/s{seed}/metrics.json"
                          if pretrained else None),
            })
    runs += [{"variant": RANDOM_INIT_LABEL, "masking": RANDOM_INIT, "head": "", "seed": seed,
              "probe": f"{RESULTS}/probe/{RANDOM_INIT}/s{seed}/metrics.json"} for seed in SEEDS]
    return runs


def table_inputs(wildcards):
    """Every file the table reads (table_runs)."""
    return sorted({path for run in table_runs() for key, path in run.items()
                   if key in ("metrics", "validation", "probe") and path})


def processes_per_job(resources):
    """Training processes per node of a job (mofo.recipe.batch.processes_per_node: SLURM
    tasks per node, else GPUs, else engine.nproc_per_node)."""
    return processes_per_node(
        {"tasks_per_node": getattr(resources, "tasks_per_node", 0),
         "gpu": getattr(resources, "gpu", 0)}, config["engine"]["nproc_per_node"])


def training_threads():
    """Threads of a pretrain / finetune / evaluate job run locally: engine.threads_per_job,
    0 = all of --cores (Snakemake caps the 1024). The SLURM profile's set-threads wins."""
    return int(config["engine"]["threads_per_job"]) or 1024


def nodes_per_job(resources):
    """Nodes of a training job (SLURM profile: `nodes`); more than one launches with srun."""
    return int(getattr(resources, "nodes", 1) or 1)


# Cluster execution: one shard's decode -> optical_flow -> (trajectories) -> motion_map ->
# motion_boxes -> motion_pictures jobs run as ONE cluster job (Snakemake `group:`), so a 757-shard dataset is
# 757 submissions, not 3,785. The id has no {shard}: the shards' chains are separate connected
# components of the group, one job each, and `--group-components motion_chain=N` can put N
# shards in one job (a per-shard id would make each shard a group of its own, never merged).
# Local runs (--cores N, no executor plugin) ignore groups. Snakemake combines the group's
# resources: the largest CPUs / memory of its rules, the SUM of their runtimes.
SHARD_GROUP = "motion_chain"


# Probes (rules/probe.smk), per seed: every pretraining of the variants, and `random` -- the
# pretraining's initial weights under the {seed} wildcard, the reference row.
RANDOM_INIT = "random"
PROBE_ENCODERS = PRETRAININGS + [RANDOM_INIT]


def features_checkpoint(wildcards):
    """The pretrained checkpoint an encoder's features come from; none for `random`."""
    if wildcards.masking == RANDOM_INIT:
        return []
    return [f"{RESULTS}/pretrain/{wildcards.masking}/s{wildcards.seed}/checkpoint.pt"]


def launch_resources(rule_name):
    """The resources that decide a training job's process count (gpu, nodes, tasks_per_node),
    as the profile / --set-resources left them on the rule (static values only)."""
    resources = getattr(rules, rule_name).rule.resources
    return {name: resources[name].value for name in ("gpu", "nodes", "tasks_per_node")
            if name in resources and not callable(resources[name].value)}

