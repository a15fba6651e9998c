# Motion boxes -> MOFO pretraining -> fine-tuning -> multi-view evaluation -> the variant table.
# A pretrained model is shared by the fine-tuning heads that start from it: pretraining runs
# once per masking strategy, fine-tuning once per (masking, head).


rule pretrain:
    """Masked-autoencoder pretraining with `tube` (VideoMAE), `mofo` (box-guided) or `everest`
    (token selection) masking; `<masking>_mme` predicts MME's trajectories and HOG instead of
    pixels."""
    input:
        # manifest, frames, boxes (+ trajectories for target mme, pooled_flow for mgmae)
        unpack(pretrain_inputs),
    output:
        checkpoint=P("pretrain", CHECKPOINT),
        validation=P("pretrain", VALIDATION),
    params:
        # metrics.jsonl and checkpoint-last.pt are not declared outputs on purpose: Snakemake
        # deletes a failed (preempted) job's outputs, and a resumed run appends to them.
        out_dir=filled("pretrain"),
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
        unpack(labelled_inputs),  # manifest, frames, boxes
        pretrained=pretrained_input,
    output:
        checkpoint=P("finetune", CHECKPOINT),
    params:
        out_dir=filled("finetune"),
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
        unpack(labelled_inputs),  # manifest, frames, boxes
        checkpoint=P("finetune", CHECKPOINT),
    output:
        metrics=P("eval", METRICS),
        predictions=P("eval", PREDICTIONS),
    params:
        out_dir=filled("eval"),
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
            P("table"),
            caption="../report/table.rst",
            category="5. Variant table",
            labels={"file": "table.csv"},
        ),
        md=P("table_md"),
        seeds=P("table_seeds"),
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
        checkpoint=P("pretrain", CHECKPOINT),
    output:
        reconstructions=report(
            directory(P("report_pretrain", RECONSTRUCTIONS)),
            patterns=["{clip}.png"],
            caption="../report/reconstructions.rst",
            category="2. Pretraining",
            subcategory="{masking} masking, seed {seed}",
            labels={"clip": "{clip}"},
        ),
    params:
        reconstructions=filled("pretrain", RECONSTRUCTIONS),
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
        finetuned=P("finetune", CHECKPOINT),
        metrics=P("eval", METRICS),
    output:
        curves=report(
            P("report_variant", CURVES),
            caption="../report/curves.rst",
            category="3. Training curves",
            labels={"masking": "{masking}", "head": "{head}", "seed": "{seed}"},
        ),
        confusion=report(
            P("report_variant", CONFUSION),
            caption="../report/confusion.rst",
            category="4. Confusion matrices",
            labels={"masking": "{masking}", "head": "{head}", "seed": "{seed}"},
        ),
    params:
        pretrain_metrics=lambda wildcards: (
            filled("pretrain", METRICS_LOG)(wildcards) if wildcards.masking != SCRATCH else ""
        ),
        finetune_metrics=filled("finetune", METRICS_LOG),
        confusion=filled("eval", CONFUSION),
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
        csv=P("table"),
    output:
        figure=report(
            P("report_table"),
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
        P("table"),
        P("table_md"),
        P("box_quality"),
        P("report_table"),
        expand(P("report_pretrain", RECONSTRUCTIONS), masking=PRETRAININGS, seed=SEEDS),
        [P("report_variant", name, masking=v["masking"], head=variant_finetuning(v), seed=seed)
         for v in VARIANTS.values() for seed in SEEDS for name in (CURVES, CONFUSION)],
