# mofo: the MOFO pipeline as one Snakemake DAG.
#   decode -> optical_flow -> motion_map -> motion_boxes -> pretrain -> finetune -> evaluate -> table
# Targets: `all` (default: the variant table), `motion` (boxes + box quality report).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


validate(config, schema="config/config.schema.yaml")


from mofo.config import check_preset

check_preset(config)  # a real dataset on the demo's 32-px defaults stops here, naming the overlay


from mofo.tracking import finish_workflow_run, start_workflow_run
from mofo.training.restart import forced_environment


# A job's own Snakemake (--mode remote: in the batch step and, started by srun, in the job
# step) ignores SLURM's warning signal. SIGUSR1 kills a Python process without a handler: the
# job step's task would end at once and the step with it (on a cluster that tracks processes
# by cgroup, the training too, before it saved), instead of waiting until the training has
# written checkpoint-last.pt and exited 75 (mofo/stages.py passes the signal on).
if workflow.remote_exec:
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# Main process only, before any job starts: tell the training jobs what this invocation
# forces (--forcerun/-R, -f, -F), so a forced job trains from step 0 while a retry of its
# interrupted attempt resumes (mofo/training/restart.py explains why an environment variable).
onstart:
    os.environ.update(forced_environment(workflow.dag_settings))
    start_workflow_run(config)


onsuccess:
    finish_workflow_run(config, "FINISHED", log)


onerror:
    finish_workflow_run(config, "FAILED", log)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/motion.smk"
include: "rules/training.smk"
include: "rules/probe.smk"


# Each training stage's batch plan for the resources in force (profile / --set-resources;
# mofo/recipe/batch.py): the recipe's total batch, the per-GPU batch and gradient accumulation
# that give it, the lrs. Printed once by the main process, dry runs (`snakemake -n`) included.
if workflow.is_main_process:
    for line in describe_plans(config, {s: launch_resources(s) for s in TRAINING_STAGES}):
        print(f"mofo: {line}", file=sys.stderr)


# Seconds of plotting each: on a cluster they run where snakemake runs, not as SLURM jobs.
localrules:
    all,
    motion,
    probes,
    figures,
    pretrain_figures,
    variant_figures,
    table_figure,


rule all:
    input:
        P("table"),
        P("table_md"),
        P("box_quality"),
    default_target: True


rule motion:
    input:
        P("box_quality"),
        expand(P("boxes"), shard=SHARDS),
