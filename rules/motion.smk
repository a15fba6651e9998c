# Frame store -> optical flow -> motion map (motion boundaries) -> motion boxes -> quality;
# frames -> trajectories (MME's target, only when a pretraining asks for it).


rule optical_flow:
    """TV-L1 (default), DIS or Farneback flow for every frame pair of one shard."""
    input:
        pack=P("frames_pack"),
        index=P("frames_index"),
    output:
        flow=maybe_temp(P("flow")),
        # Flow of the picture clips only, kept: pictures never recompute the temporary flow.
        picture_flow=P("picture_flow"),
        # Every clip's flow pooled to a coarse grid, kept: what mgmae masking reads.
        pooled_flow=P("pooled_flow"),
    params:
        prefix=filled("frames"),
        config_hash=stage_hash(config, "optical_flow"),
    log:
        f"{LOGS}/optical_flow/{{shard}}.log",
    benchmark:
        f"{BENCH}/optical_flow/{{shard}}.tsv"
    group:
        SHARD_GROUP
    threads: 1
    resources:
        mem_mb=4000,
        runtime=600,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/optical_flow.py"


rule trajectories:
    """MME's point trajectories of one shard: the flow computed again from the frames (not read
    from the temporary flow file, so a trajectories job added later reruns nothing before it;
    mofo/motion/trajectories.py), int8 per-step displacements + valid steps per point."""
    input:
        pack=P("frames_pack"),
        index=P("frames_index"),
    output:
        trajectories=P("trajectories"),
    params:
        prefix=filled("frames"),
        settings=config["trajectories"],
        flow=config["optical_flow"],
        config_hash=stage_hash(config, "trajectories"),
    log:
        f"{LOGS}/trajectories/{{shard}}.log",
    benchmark:
        f"{BENCH}/trajectories/{{shard}}.tsv"
    group:
        SHARD_GROUP
    threads: 1
    resources:
        mem_mb=4000,
        runtime=600,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/trajectories.py"


rule motion_map:
    """Motion map: boundaries (paper Eq. 1) or camera-cancelled residual flow, low-pass filtered."""
    input:
        flow=P("flow"),
        # read only for motion_map.texture_confidence (the frames' texture weights the flow)
        pack=P("frames_pack"),
        index=P("frames_index"),
    output:
        motion_map=P("motion_map"),
        raw_flow_map=P("raw_flow_map"),
    params:
        prefix=filled("frames"),
        config_hash=stage_hash(config, "motion_map"),
    log:
        f"{LOGS}/motion_map/{{shard}}.log",
    benchmark:
        f"{BENCH}/motion_map/{{shard}}.tsv"
    group:
        SHARD_GROUP
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/motion_map.py"


rule motion_boxes:
    """Per-frame motion boxes from the motion map (and, as a baseline, from raw flow magnitude)."""
    input:
        motion_map=P("motion_map"),
        raw_flow_map=P("raw_flow_map"),
        index=P("frames_index"),
    output:
        boxes=P("boxes"),
        raw_flow_boxes=P("raw_flow_boxes"),
        report=P("boxes_report"),
    params:
        prefix=filled("frames"),
        config_hash=stage_hash(config, "motion_boxes"),
    log:
        f"{LOGS}/motion_boxes/{{shard}}.log",
    benchmark:
        f"{BENCH}/motion_boxes/{{shard}}.tsv"
    group:
        SHARD_GROUP
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/motion_boxes.py"


rule motion_pictures:
    """Frame | flow | motion map | boxes side by side for a few clips of one shard."""
    input:
        picture_flow=P("picture_flow"),
        motion_map=P("motion_map"),
        boxes=P("boxes"),
        raw_flow_boxes=P("raw_flow_boxes"),
        index=P("frames_index"),
        gt=gt_boxes_input,
    output:
        report(
            directory(P("motion_pictures")),
            patterns=["{clip}.png"],
            caption="../report/motion_pictures.rst",
            category="1. Motion boxes",
            subcategory="Motion pictures",
            labels={"clip": "{clip}"},  # one label: a sparse two-label grid breaks the page
        ),
    params:
        prefix=filled("frames"),
        config_hash=stage_hash(config, "motion_pictures"),
    log:
        f"{LOGS}/motion_pictures/{{shard}}.log",
    benchmark:
        f"{BENCH}/motion_pictures/{{shard}}.tsv"
    group:
        SHARD_GROUP
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/motion_pictures.py"


rule box_quality:
    """Box quality against ground truth (demo), the raw-flow baseline, token-grid IoU, fallback counts."""
    input:
        boxes=expand(P("boxes"), shard=SHARDS),
        raw_flow_boxes=expand(P("raw_flow_boxes"), shard=SHARDS),
        reports=expand(P("boxes_report"), shard=SHARDS),
        status=expand(P("frames_status"), shard=SHARDS),
        pictures=expand(P("motion_pictures"), shard=SHARDS),
        gt=gt_boxes_input,
    output:
        report(
            P("box_quality"),
            caption="../report/box_quality.rst",
            category="1. Motion boxes",
            subcategory="Box quality",
            labels={"file": "box_quality.json"},
        ),
    params:
        config_hash=stage_hash(config, "box_quality"),
    log:
        f"{LOGS}/box_quality.log",
    benchmark:
        f"{BENCH}/box_quality.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/box_quality.py"
