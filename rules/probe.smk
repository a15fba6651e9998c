# Probes of the frozen pretrained encoders: pooled features per clip -> kNN and linear probe.
# {masking} is a pretraining (tube, mofo) or `random`: the pretraining's initial weights
# under pretrain.seed, the reference row. Target: `probes` (every encoder of the variants).


rule features:
    """Pooled encoder features (mean over all tokens after the encoder's norm) per clip of the
    train and validation splits, one centre view per clip; reads decoded frames only."""
    input:
        manifest=f"{RESULTS}/manifest.csv",
        frames=expand(f"{RESULTS}/frames/{{shard}}.jpgpack", shard=SHARDS),
        checkpoint=features_checkpoint,
    output:
        train=f"{RESULTS}/features/{{masking}}/train.npz",
        validation=f"{RESULTS}/features/{{masking}}/validation.npz",
    params:
        out_dir=lambda wildcards: f"{RESULTS}/features/{wildcards.masking}",
        source=lambda wildcards, input: input.checkpoint[0] if input.checkpoint else "random",
        config_hash=stage_hash(config, "features"),
    log:
        f"{LOGS}/features/{{masking}}.log",
    benchmark:
        f"{BENCH}/features/{{masking}}.tsv"
    threads: training_threads()
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/features.py"


rule probe:
    """kNN and linear probe of one encoder's features: top-1 on the validation split."""
    input:
        train=f"{RESULTS}/features/{{masking}}/train.npz",
        validation=f"{RESULTS}/features/{{masking}}/validation.npz",
    output:
        metrics=f"{RESULTS}/probe/{{masking}}/metrics.json",
    params:
        probe=config["probe"],
        config_hash=stage_hash(config, "probe"),
    log:
        f"{LOGS}/probe/{{masking}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/probe.py"


rule probes:
    """Every encoder's probe: the pretrainings of the variants and the random reference."""
    input:
        expand(f"{RESULTS}/probe/{{masking}}/metrics.json", masking=PROBE_ENCODERS),
