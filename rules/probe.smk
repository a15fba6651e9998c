# Probes of the frozen pretrained encoders: pooled features per clip -> kNN and linear probe
# (and, with probe.attentive.enabled, the tokens per clip -> attentive probe).
# {masking} is a pretraining (tube, mofo) or `random`: the pretraining's initial weights under
# the {seed} wildcard, the reference row. Target: `probes` (every encoder x every seed).


rule features:
    """Pooled encoder features (mean over all tokens after the encoder's norm) per clip of the
    train and validation splits, one centre view per clip; reads decoded frames only. With
    probe.attentive.enabled the files also keep every token (float16, clips x t*h*w x D: large
    on real data) for the attentive probe."""
    input:
        unpack(frames_inputs),  # manifest, frames
        checkpoint=features_checkpoint,
    output:
        train=P("features", FEATURES, split="train"),
        validation=P("features", FEATURES, split="validation"),
    params:
        out_dir=filled("features"),
        source=lambda wildcards, input: input.checkpoint[0] if input.checkpoint else RANDOM_INIT,
        config_hash=stage_hash(config, "features"),
    log:
        f"{LOGS}/features/{{masking}}-s{{seed}}.log",
    benchmark:
        f"{BENCH}/features/{{masking}}-s{{seed}}.tsv"
    threads: training_threads()
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/train.yaml"
    script:
        "../workflow/scripts/features.py"


rule probe:
    """kNN and linear probe of one encoder's pooled features and, with probe.attentive.enabled,
    the attentive probe of its tokens (learned queries, seeded by {seed}): top-1 on the
    validation split."""
    input:
        train=P("features", FEATURES, split="train"),
        validation=P("features", FEATURES, split="validation"),
    output:
        metrics=P("probe", METRICS),
    params:
        probe=config["probe"],
        config_hash=stage_hash(config, "probe"),
    log:
        f"{LOGS}/probe/{{masking}}-s{{seed}}.log",
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
        expand(P("probe", METRICS), masking=PROBE_ENCODERS, seed=SEEDS),
