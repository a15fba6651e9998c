# Datasets -> manifest -> decoded frame store (one job per shard).


rule demo_data:
    """Generate the built-in "motion shapes" demo videos and their ground-truth boxes."""
    output:
        clips=f"{DEMO_ROOT}/clips.csv",
        gt=f"{DEMO_ROOT}/gt_boxes.csv",
        videos=directory(f"{DEMO_ROOT}/videos"),
    params:
        demo=config["dataset"]["demo"],
        config_hash=stage_hash(config, "demo_data"),
    log:
        f"{LOGS}/demo_data.log",
    benchmark:
        f"{BENCH}/demo_data.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/demo_data.py"


rule manifest:
    """One table of every clip: id, video path, label(s), split, frame range, fps, shard."""
    input:
        manifest_inputs,
    output:
        P("manifest"),
    params:
        config_hash=stage_hash(config, "manifest"),
    log:
        f"{LOGS}/manifest.log",
    benchmark:
        f"{BENCH}/manifest.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/manifest.py"


rule decode:
    """Decode one shard's clips with decord, resize, store as a memory-mappable JPEG pack."""
    input:
        manifest=P("manifest"),
    output:
        pack=P("frames_pack"),
        index=P("frames_index"),
        status=P("frames_status"),
    params:
        prefix=filled("frames"),
        config_hash=stage_hash(config, "decode"),
    log:
        f"{LOGS}/decode/{{shard}}.log",
    benchmark:
        f"{BENCH}/decode/{{shard}}.tsv"
    group:
        SHARD_GROUP
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/decode.py"
