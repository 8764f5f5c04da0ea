# Feature statistics per (cell, layer), and SAE diffs: seed-pair calibration, labelled diffs, evolution.


rule feature_stats:
    input:
        saes=lambda w: [
            f"{cfglib.sae_dir(cfglib.Cell(w.model, w.data), int(w.layer), n)}/sae_weights.safetensors" for n in SAES
        ],
        acts=lambda w: manifests(f"{w.model}_{w.data}"),
        model="results/models/{model}",
        samples="results/data/{data}/samples.parquet",
    output:
        [f"results/features/{{model}}_{{data}}/layer{{layer}}/{name}/stats.parquet" for name in SAES],
    log:
        "logs/feature_stats/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("feature_stats", "{model}_{data}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(saes=config["saes"], features=config["features"], **placement()),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff features --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --model-dir {input.model:q} --samples {input.samples:q} "
        "--threads {threads} --no-progress 3>&1 > {log:q} 2>&1"


rule train_seed_sae:
    """The calibration partner of each base-cell SAE: same config and data, other seeds."""
    input:
        unpack(lambda w: streaming_inputs(w, "M0", "D0")),
        acts=manifests("M0_D0"),
    output:
        [f"results/calibration/seed_saes/M0_D0/layer{{layer}}/{name}/sae_weights.safetensors" for name in DIFF_SAES],
    log:
        "logs/train_seed_sae/layer{layer}.log",
    benchmark:
        bench("train_seed_sae", "layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(saes=seed_pair_saes(), training=seed_pair_training(), **placement()),
        stream=lambda w: streaming_args(w, "M0", "D0"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff train --spec {params.spec:q} --model M0 --data D0 --layer {wildcards.layer} "
        "--out-root results/calibration/seed_saes {params.stream} --threads {threads} --no-progress 3>&1 > {log:q} 2>&1"


rule calibrate:
    input:
        saes=lambda w: [
            f"{cfglib.sae_dir(cfglib.Cell('M0', 'D0'), int(w.layer), n)}/sae_weights.safetensors" for n in DIFF_SAES
        ],
        seed=[
            f"results/calibration/seed_saes/M0_D0/layer{{layer}}/{name}/sae_weights.safetensors" for name in DIFF_SAES
        ],
    output:
        [f"results/calibration/layer{{layer}}/{name}.json" for name in DIFF_SAES],
    log:
        "logs/calibrate/layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, diff=config["diff"]),
    shell:
        "sae-diff calibrate --spec {params.spec:q} --layer {wildcards.layer} "
        "--saes results/saes/M0_D0/layer{wildcards.layer} "
        "--seed-saes results/calibration/seed_saes/M0_D0/layer{wildcards.layer} "
        "--out-dir results/calibration/layer{wildcards.layer} > {log:q} 2>&1"


rule diff_saes:
    input:
        saes=lambda w: [
            f"results/saes/{cell}/layer{w.layer}/{n}/sae_weights.safetensors" for cell in (w.a, w.b) for n in DIFF_SAES
        ],
        stats=lambda w: [
            f"results/features/{cell}/layer{w.layer}/{n}/stats.parquet" for cell in (w.a, w.b) for n in DIFF_SAES
        ],
        calibration=[f"results/calibration/layer{{layer}}/{name}.json" for name in DIFF_SAES],
    output:
        [f"results/diff/{{a}}__{{b}}/layer{{layer}}/{name}.json" for name in DIFF_SAES],
    log:
        "logs/diff_saes/{a}__{b}_layer{layer}.log",
    benchmark:
        bench("diff_saes", "{a}__{b}_layer{layer}")
    wildcard_constraints:
        a=r"M\d+_D\d+",
        b=r"M\d+_D\d+",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, diff=config["diff"]),
    shell:
        "sae-diff diff --spec {params.spec:q} --a {wildcards.a} --b {wildcards.b} --layer {wildcards.layer} "
        "--calibration results/calibration/layer{wildcards.layer} "
        "--out-dir results/diff/{wildcards.a}__{wildcards.b}/layer{wildcards.layer} > {log:q} 2>&1"


rule evolution:
    input:
        diffs=lambda w: [
            f"results/diff/{cfglib.pair_name(a, b)}/layer{w.layer}/{n}.json"
            for a, b, _ in cfglib.diff_pairs(config)
            for n in DIFF_SAES
        ],
    output:
        [f"results/evolution/layer{{layer}}/{name}.json" for name in DIFF_SAES],
    log:
        "logs/evolution/layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, grid=config["grid"], data=config["data"]),
    shell:
        "sae-diff evolution --spec {params.spec:q} --layer {wildcards.layer} "
        "--out-dir results/evolution/layer{wildcards.layer} > {log:q} 2>&1"


rule probes:
    input:
        stats=lambda w: [f"results/features/{w.model}_{w.data}/layer{w.layer}/{n}/stats.parquet" for n in SAES],
        base=lambda w: [
            f"{cfglib.sae_dir(cfglib.Cell('M0', 'D0'), int(w.layer), n)}/sae_weights.safetensors" for n in SAES
        ],
        acts=lambda w: manifests(f"{w.model}_{w.data}"),
        samples="results/data/{data}/samples.parquet",
        model=lambda w: [] if config["activations"]["cache"] else f"results/models/{w.model}",
    output:
        [
            f"results/probes/{{model}}_{{data}}/layer{{layer}}/{name}/{metric}.json"
            for name in SAES
            for metric in PROBE_METRICS
        ],
    log:
        "logs/probes/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("probes", "{model}_{data}_layer{layer}")
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(
            saes=config["saes"],
            probes=config["probes"],
            metrics=PROBE_METRICS,
            **({} if config["activations"]["cache"] else placement()),
        ),
        model_dir=lambda w, input: f"--model-dir {shlex.quote(str(input.model))}" if input.model else "",
    shell:
        "sae-diff probe --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --samples {input.samples:q} {params.model_dir} > {log:q} 2>&1"


rule probe_comparison:
    input:
        probes=lambda w: [
            f"results/probes/{c.name}/layer{w.layer}/{n}/{m}.json" for c in CELLS for n in SAES for m in PROBE_METRICS
        ],
        diffs=lambda w: [
            f"results/diff/{cfglib.pair_name(a, b)}/layer{w.layer}/{n}.json"
            for a, b, _ in cfglib.diff_pairs(config)
            for n in DIFF_SAES
        ],
    output:
        "results/probes/comparison_layer{layer}.json",
    log:
        "logs/probe_comparison/layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(
            saes=config["saes"],
            probes=config["probes"],
            metrics=PROBE_METRICS,
            cells=[c.name for c in CELLS],
            diff_saes=sorted(DIFF_SAES),
            grid=config["grid"],
            data=config["data"],
        ),
    shell:
        "sae-diff probe-compare --spec {params.spec:q} --layer {wildcards.layer} --out {output:q} > {log:q} 2>&1"
