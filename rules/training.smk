# Motion boxes -> MOFO pretraining -> fine-tuning -> multi-view evaluation -> the variant table.
# A pretrained model is shared by the fine-tuning heads that start from it: pretraining runs
# once per masking strategy, fine-tuning once per (masking, head).


rule pretrain:
    """Masked-autoencoder pretraining with `tube` (VideoMAE) or `mofo` (box-guided) masking."""
    input:
        manifest=f"{RESULTS}/manifest.csv",
        frames=expand(f"{RESULTS}/frames/{{shard}}.jpgpack", shard=SHARDS),
        boxes=expand(f"{RESULTS}/boxes/{{shard}}.csv", shard=SHARDS),
    output:
        checkpoint=f"{RESULTS}/pretrain/{{masking}}/checkpoint.pt",
    params:
        # metrics.jsonl and checkpoint-last.pt are not declared outputs on purpose: Snakemake
        # deletes a failed (preempted) job's outputs, and a resumed run appends to them.
        out_dir=lambda wildcards: f"{RESULTS}/pretrain/{wildcards.masking}",
        nproc=lambda wildcards, resources: processes_per_job(resources),
        nodes=lambda wildcards, resources: nodes_per_job(resources),
        config_hash=stage_hash(config, "pretrain"),
    log:
        f"{LOGS}/pretrain/{{masking}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{masking}}.tsv"
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
        pretrained=f"{RESULTS}/pretrain/{{masking}}/checkpoint.pt",
    output:
        checkpoint=f"{RESULTS}/finetune/{{masking}}-{{head}}/checkpoint.pt",
    params:
        out_dir=lambda wildcards: f"{RESULTS}/finetune/{wildcards.masking}-{wildcards.head}",
        nproc=lambda wildcards, resources: processes_per_job(resources),
        nodes=lambda wildcards, resources: nodes_per_job(resources),
        config_hash=stage_hash(config, "finetune"),
    log:
        f"{LOGS}/finetune/{{masking}}-{{head}}.log",
    benchmark:
        f"{BENCH}/finetune/{{masking}}-{{head}}.tsv"
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
        checkpoint=f"{RESULTS}/finetune/{{masking}}-{{head}}/checkpoint.pt",
    output:
        metrics=f"{RESULTS}/eval/{{masking}}-{{head}}/metrics.json",
        predictions=f"{RESULTS}/eval/{{masking}}-{{head}}/predictions.csv",
    params:
        out_dir=lambda wildcards: f"{RESULTS}/eval/{wildcards.masking}-{wildcards.head}",
        config_hash=stage_hash(config, "evaluate"),
    log:
        f"{LOGS}/evaluate/{{masking}}-{{head}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{masking}}-{{head}}.tsv"
    threads: training_threads()
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/evaluate.py"


rule table:
    """The paper's variant table: one row per (masking, head), the paper's numbers beside ours."""
    input:
        metrics=[f"{RESULTS}/eval/{v['masking']}-{v['head']}/metrics.json" for v in VARIANTS.values()],
    output:
        csv=f"{RESULTS}/table.csv",
        md=f"{RESULTS}/table.md",
    params:
        variants=VARIANTS,
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
