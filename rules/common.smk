# Shared helpers for the rules. Everything computed here is cheap: the shard list comes
# from the annotation files (or the demo config), never from decoding video.
from mofo import paths
from mofo.data.adapters import annotation_files
from mofo.data.manifest import shard_names
from mofo.evaluation.table import RANDOM_ENCODER as RANDOM_INIT_LABEL  # the random encoder's row
from mofo.paths import (  # file names inside a run folder
    CHECKPOINT,
    CONFUSION,
    CURVES,
    FEATURES,
    METRICS,
    METRICS_LOG,
    PREDICTIONS,
    RECONSTRUCTIONS,
    VALIDATION,
)
from mofo.recipe.batch import TRAINING_STAGES, describe_plans, processes_per_node
from mofo.runtime.data import pretraining_reads
from mofo.masking import check_strategy
from mofo.provenance import (  # a rule's rerun trigger: what its stage reads
    FINETUNING_NAME,
    PRETRAINING_NAME,
    RANDOM_ENCODER as RANDOM_INIT,
    SCRATCH,
    finetuning_name,
    pretrain_stage,
    pretraining_spec,
    stage_hash,
)

# Every results path comes from mofo.paths (the layout's one owner): P("boxes") is
# "<results>/<dataset>/boxes/{shard}.csv", a Snakemake pattern; P("pretrain", CHECKPOINT, seed=0)
# fills the wildcards it is given and leaves the others to Snakemake.
RESULTS = paths.results_root(config)
LOGS = paths.pattern("logs", RESULTS)
BENCH = paths.pattern("benchmarks", RESULTS)
SHARDS = shard_names(config)
DEMO_ROOT = config["dataset"]["demo"]["root"]


def P(key, file="", **fixed):
    """The results path ``key`` of mofo.paths (LAYOUT / BESIDE) under RESULTS, with ``file``
    inside it; the wildcards not in ``fixed`` stay ``{name}`` for Snakemake."""
    return paths.pattern(key, RESULTS, file=file, **fixed)


def filled(key, file=""):
    """A params function: P(key, file) with the job's own wildcards filled in."""
    names = paths.wildcards(key, file)
    return lambda wildcards: P(key, file, **{k: v for k, v in wildcards.items() if k in names})


wildcard_constraints:
    shard=paths.SHARD_WILDCARD,
    masking=PRETRAINING_NAME,  # a pretraining name: <strategy> or <strategy>_<target>
    head=FINETUNING_NAME,  # a fine-tuning name: <head> or <head>_l<percent> (a share of the labels)
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
    return [gt, P("manifest")] if gt else []


def pretrain_inputs(wildcards):
    """What a pretraining reads (mofo.paths.training_inputs, the list its resume check digests
    too, mofo.runtime.data.input_files): the manifest, every shard's frames and boxes, MME's
    trajectories for target mme (tube_mme, mofo_mme) and the pooled flow for a masking that
    follows the flow (mgmae, mgmae_mme); the others never wait for those."""
    reads = pretraining_reads(*pretraining_spec(wildcards.masking))
    return paths.training_inputs(RESULTS, SHARDS, **reads)


def labelled_inputs(wildcards):
    """What fine-tuning and evaluation read: the manifest, every shard's frames and boxes."""
    return paths.training_inputs(RESULTS, SHARDS)


def frames_inputs(wildcards):
    """What the features stage reads: the manifest and every shard's frames (no boxes)."""
    return paths.training_inputs(RESULTS, SHARDS, boxes=False)


def maybe_temp(path):
    """Flow is large: Snakemake deletes it after its consumers unless optical_flow.keep."""
    return path if config["optical_flow"]["keep"] else temp(path)


def pretrain_config_hash(wildcards):
    """The pretraining's rerun trigger: what its target's stage reads (pretrain / pretrain_mme),
    with its masking strategy's own section for that strategy only (VARIANT_READS: mgmae)."""
    strategy, target = pretraining_spec(wildcards.masking)
    return stage_hash(config, pretrain_stage(target), strategy)


VARIANTS = config["variants"]
SEEDS = config["seeds"]
PRETRAININGS = sorted({v["masking"] for v in VARIANTS.values()} - {SCRATCH})
for _name in PRETRAININGS + [config["masking"]["strategy"]]:  # the registry owns the names
    check_strategy(pretraining_spec(_name)[0])


def variant_finetuning(v):
    """A variant's fine-tuning name, its runs' {head}: the head, with _l<percent> when the
    variant fine-tunes on a share of the labels (``label_fraction``)."""
    return finetuning_name(v["head"], v.get("label_fraction"))


for _name, _v in VARIANTS.items():  # a bad share stops the planning with the variant's name
    try:
        variant_finetuning(_v)
    except ValueError as error:
        raise ValueError(f"variants.{_name}: {error}") from None


def pretrained_input(wildcards):
    """The pretrained checkpoint a fine-tuning starts from; none for the scratch variant."""
    if wildcards.masking == SCRATCH:
        return []
    return P("pretrain", CHECKPOINT, masking=wildcards.masking, seed=wildcards.seed)


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
                "label_fraction": v.get("label_fraction", config["finetune"]["label_fraction"]),
                "metrics": P("eval", METRICS, masking=v["masking"], head=variant_finetuning(v),
                             seed=seed),
                "validation": (P("pretrain", VALIDATION, masking=v["masking"], seed=seed)
                               if pretrained else None),
                "probe": (P("probe", METRICS, masking=v["masking"], seed=seed)
                          if pretrained else None),
            })
    runs += [{"variant": RANDOM_INIT_LABEL, "masking": RANDOM_INIT, "head": "", "seed": seed,
              "probe": P("probe", METRICS, masking=RANDOM_INIT, seed=seed)} for seed in SEEDS]
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
PROBE_ENCODERS = PRETRAININGS + [RANDOM_INIT]


def features_checkpoint(wildcards):
    """The pretrained checkpoint an encoder's features come from; none for `random`."""
    if wildcards.masking == RANDOM_INIT:
        return []
    return [P("pretrain", CHECKPOINT, masking=wildcards.masking, seed=wildcards.seed)]


def launch_resources(rule_name):
    """The resources that decide a training job's process count (gpu, nodes, tasks_per_node),
    as the profile / --set-resources left them on the rule (static values only)."""
    resources = getattr(rules, rule_name).rule.resources
    return {name: resources[name].value for name in ("gpu", "nodes", "tasks_per_node")
            if name in resources and not callable(resources[name].value)}

