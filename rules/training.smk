# Motion boxes -> MOFO pretraining -> fine-tuning -> multi-view evaluation -> the variant table.
# A pretrained model is shared by the fine-tuning heads that start from it: pretraining runs
# once per masking strategy, fine-tuning once per (masking, head).


rule pretrain:
    """Masked-autoencoder pretraining with `tube` (VideoMAE), `mofo` (box-guided) or `everest`
    (token selection) masking; `<masking>_mme` predicts MME's trajectories and HOG instead of
    pixels."""
    input:
        manifest=f"{RESULTS}/manifest.csv",
        frames=expand(f"{RESULTS}/frames/{{shard}}.jpgpack", shard=SHARDS),
        boxes=expand(f"{RESULTS}/boxes/{{shard}}.csv", shard=SHARDS),
        trajectories=pretrain_trajectories,  # target mme only
        pooled_flow=pooled_flow_inputs,
    output:
        checkpoint=f"{RESULTS}/pretrain/{{masking}}/s{{seed}}/checkpoint.pt",
        validation=f"{RESULTS}/pretrain/{{masking}}/s{{seed}}/validation.json",
    params:
        # metrics.jsonl and checkpoint-last.pt are not declared outputs on purpose: Snakemake
        # deletes a failed (preempted) job's outputs, and a resumed run appends to them.
        out_dir=lambda wildcards: f"{RESULTS}/pretrain/{wildcards.masking}/s{wildcards.seed}",
        nproc=lambda wildcards, resources: processes_per_job(resources),
        nodes=lambda wildcards, resources: nodes_per_job(resources),
        config_hash=pretrain_config_hash,
    log:
        f"{LOGS}/pretrain/{{masking}}-s{{seed}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{masking}}-s{{seed}}.tsv"
    threads: training_threads()
    resources:
        mem_mb=16000,
        runtime=2880,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/pretrain.py"


rule finetune:
    """Supervised fine-tuning from the pretrained encoder with a `mean` or `mca` head."""
    input:
        manifest=f"{RESULTS}/manifest.csv",
        frames=expand(f"{RESULTS}/frames/{{shard}}.jpgpack", shard=SHARDS),
        boxes=expand(f"{RESULTS}/boxes/{{shard}}.csv", shard=SHARDS),
        pretrained=pretrained_input,
    output:
        checkpoint=f"{RESULTS}/finetune/{{masking}}-{{head}}/s{{seed}}/checkpoint.pt",
    params:
        out_dir=lambda wildcards: f"{RESULTS}/finetune/{wildcards.masking}-{wildcards.head}/s{wildcards.seed}",
        nproc=lambda wildcards, resources: processes_per_job(resources),
        nodes=lambda wildcards, resources: nodes_per_job(resources),
        config_hash=stage_hash(config, "finetune"),
    log:
        f"{LOGS}/finetune/{{masking}}-{{head}}-s{{seed}}.log",
    benchmark:
        f"{BENCH}/finetune/{{masking}}-{{head}}-s{{seed}}.tsv"
    threads: training_threads()
    resources:
        mem_mb=16000,
        runtime=1440,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/finetune.py"


rule evaluate:
    """Multi-view testing of one fine-tuned variant: top-1/top-5, per-class, confusion matrix."""
    input:
        manifest=f"{RESULTS}/manifest.csv",
        frames=expand(f"{RESULTS}/frames/{{shard}}.jpgpack", shard=SHARDS),
        boxes=expand(f"{RESULTS}/boxes/{{shard}}.csv", shard=SHARDS),
        checkpoint=f"{RESULTS}/finetune/{{masking}}-{{head}}/s{{seed}}/checkpoint.pt",
    output:
        metrics=f"{RESULTS}/eval/{{masking}}-{{head}}/s{{seed}}/metrics.json",
        predictions=f"{RESULTS}/eval/{{masking}}-{{head}}/s{{seed}}/predictions.csv",
    params:
        out_dir=lambda wildcards: f"{RESULTS}/eval/{wildcards.masking}-{wildcards.head}/s{wildcards.seed}",
        config_hash=stage_hash(config, "evaluate"),
    log:
        f"{LOGS}/evaluate/{{masking}}-{{head}}-s{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{masking}}-{{head}}-s{{seed}}.tsv"
    threads: training_threads()
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/evaluate.py"


rule table:
    """The variant table: one row per (masking, head), mean and std over the seeds, the paper's
    numbers beside ours; the per-seed values in table_seeds.csv."""
    input:
        table_inputs,
    output:
        csv=report(
            f"{RESULTS}/table.csv",
            caption="../report/table.rst",
            category="5. Variant table",
            labels={"file": "table.csv"},
        ),
        md=f"{RESULTS}/table.md",
        seeds=f"{RESULTS}/table_seeds.csv",
    params:
        runs=table_runs(),
    log:
        f"{LOGS}/table.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/table.py"


# The report's figures (`snakemake --report`, see README "Report"): drawn from what the
# stages wrote, so they never rerun training. metrics.jsonl, confusion.png and the
# reconstructions are not declared outputs of their stages; these rules read them after the
# stage's checkpoint / metrics exist and put figures and copies under report/.


rule pretrain_figures:
    """The pretraining reconstructions of one masking strategy and seed, for the report."""
    input:
        checkpoint=f"{RESULTS}/pretrain/{{masking}}/s{{seed}}/checkpoint.pt",
    output:
        reconstructions=report(
            directory(f"{RESULTS}/report/pretrain-{{masking}}/s{{seed}}/reconstructions"),
            patterns=["{clip}.png"],
            caption="../report/reconstructions.rst",
            category="2. Pretraining",
            subcategory="{masking} masking, seed {seed}",
            labels={"clip": "{clip}"},
        ),
    params:
        reconstructions=lambda wildcards: (
            f"{RESULTS}/pretrain/{wildcards.masking}/s{wildcards.seed}/reconstructions"
        ),
    log:
        f"{LOGS}/report/pretrain-{{masking}}-s{{seed}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/report_figures.py"


rule variant_figures:
    """Training curves (loss, lr, accuracy per epoch, from metrics.jsonl) and the confusion
    matrix of one (masking, head) variant and seed, for the report."""
    input:
        pretrained=pretrained_input,
        finetuned=f"{RESULTS}/finetune/{{masking}}-{{head}}/s{{seed}}/checkpoint.pt",
        metrics=f"{RESULTS}/eval/{{masking}}-{{head}}/s{{seed}}/metrics.json",
    output:
        curves=report(
            f"{RESULTS}/report/{{masking}}-{{head}}/s{{seed}}/curves.png",
            caption="../report/curves.rst",
            category="3. Training curves",
            labels={"masking": "{masking}", "head": "{head}", "seed": "{seed}"},
        ),
        confusion=report(
            f"{RESULTS}/report/{{masking}}-{{head}}/s{{seed}}/confusion.png",
            caption="../report/confusion.rst",
            category="4. Confusion matrices",
            labels={"masking": "{masking}", "head": "{head}", "seed": "{seed}"},
        ),
    params:
        pretrain_metrics=lambda wildcards: (
            f"{RESULTS}/pretrain/{wildcards.masking}/s{wildcards.seed}/metrics.jsonl"
            if wildcards.masking != SCRATCH else ""
        ),
        finetune_metrics=lambda wildcards: (
            f"{RESULTS}/finetune/{wildcards.masking}-{wildcards.head}/s{wildcards.seed}/metrics.jsonl"
        ),
        confusion=lambda wildcards: (
            f"{RESULTS}/eval/{wildcards.masking}-{wildcards.head}/s{wildcards.seed}/confusion.png"
        ),
    log:
        f"{LOGS}/report/{{masking}}-{{head}}-s{{seed}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/report_figures.py"


rule table_figure:
    """The variant table as a bar chart (the paper's numbers beside ours), for the report."""
    input:
        csv=f"{RESULTS}/table.csv",
    output:
        figure=report(
            f"{RESULTS}/report/table.png",
            caption="../report/table_figure.rst",
            category="5. Variant table",
            labels={"file": "table.png"},
        ),
    log:
        f"{LOGS}/report/table_figure.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/report_figures.py"


rule figures:
    """Everything the report shows: `snakemake --cores 2 figures --report <html> --report-after-run`."""
    input:
        f"{RESULTS}/table.csv",
        f"{RESULTS}/table.md",
        f"{RESULTS}/motion/box_quality.json",
        f"{RESULTS}/report/table.png",
        expand(f"{RESULTS}/report/pretrain-{{masking}}/s{{seed}}/reconstructions",
               masking=PRETRAININGS, seed=SEEDS),
        [f"{RESULTS}/report/{v['masking']}-{v['head']}/s{seed}/{name}.png"
         for v in VARIANTS.values() for seed in SEEDS for name in ("curves", "confusion")],
