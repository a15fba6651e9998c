# Frame store -> optical flow -> motion map (motion boundaries) -> motion boxes -> quality.


rule optical_flow:
    """TV-L1 (default), DIS or Farneback flow for every frame pair of one shard."""
    input:
        pack=f"{RESULTS}/frames/{{shard}}.jpgpack",
        index=f"{RESULTS}/frames/{{shard}}.index.csv",
    output:
        flow=maybe_temp(f"{RESULTS}/flow/{{shard}}.npz"),
    params:
        prefix=lambda wildcards: f"{RESULTS}/frames/{wildcards.shard}",
        config_hash=section_hash("optical_flow"),
    log:
        f"{LOGS}/optical_flow/{{shard}}.log",
    benchmark:
        f"{BENCH}/optical_flow/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=600,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/optical_flow.py"


rule motion_map:
    """Motion boundaries (paper Eq. 1): invariant to camera translation, low-pass filtered."""
    input:
        flow=f"{RESULTS}/flow/{{shard}}.npz",
    output:
        motion_map=f"{RESULTS}/motion_map/{{shard}}.npz",
    params:
        config_hash=section_hash("motion_map"),
    log:
        f"{LOGS}/motion_map/{{shard}}.log",
    benchmark:
        f"{BENCH}/motion_map/{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/preprocess.yaml"
    script:
        "../workflow/scripts/motion_map.py"
