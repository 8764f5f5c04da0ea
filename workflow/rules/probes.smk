# Probes per (cell, layer) on the SAE features against each probed metric, and their comparison
# across cells (through the diffs' matching) and metrics.


rule probes:
    input:
        unpack(probe_inputs),
    output:
        [grid.probe_json("{model}_{data}", "{layer}", name, metric) for name in SAES for metric in PROBE_METRICS],
        [grid.probe_diffmean("{model}_{data}", "{layer}", name, metric) for name in SAES for metric in PROBE_METRICS],
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
        model_dir=lambda w, input: f"--model-dir {shlex.quote(str(input.model))}" if "model" in input.keys() else "",
        acts_dir=grid.activations_dir("{model}_{data}"),
        saes_dir=grid.saes_dir("{model}_{data}", "{layer}"),
        base_dir=grid.saes_dir("M0_D0", "{layer}"),
        features_dir=grid.features_dir("{model}_{data}", "{layer}"),
        out_dir=grid.probes_dir("{model}_{data}", "{layer}"),
        split=prompt_split_arg,
    shell:
        "sae-diff probe --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --samples {input.samples:q} {params.model_dir} {params.split} "
        "--acts-dir {params.acts_dir:q} "
        "--saes-dir {params.saes_dir:q} --base-saes-dir {params.base_dir:q} --features-dir {params.features_dir:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule probe_comparison:
    input:
        probes=layer_probe_jsons,
        diffs=layer_diff_jsons,
    output:
        grid.probe_comparison("{layer}"),
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
        "sae-diff probe-compare --spec {params.spec:q} --layer {wildcards.layer} --probes {input.probes:q} "
        "--diffs {input.diffs:q} --out {output:q} > {log:q} 2>&1"
