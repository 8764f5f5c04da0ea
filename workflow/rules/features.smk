# Feature statistics per (cell, layer): firing, top examples, logit lens, group statistics, pooled codes.


rule feature_stats:
    input:
        saes=cell_sae_weights,
        acts=cell_manifests,
        model=grid.model_dir("{model}"),
        samples=grid.samples("{data}"),
    output:
        [grid.feature_stats("{model}_{data}", "{layer}", name) for name in SAES],
    log:
        "logs/feature_stats/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("feature_stats", "{model}_{data}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(saes=config["saes"], features=config["features"], **placement()),
        acts_dir=grid.activations_dir("{model}_{data}"),
        saes_dir=grid.saes_dir("{model}_{data}", "{layer}"),
        out_dir=grid.features_dir("{model}_{data}", "{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff features --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --model-dir {input.model:q} --samples {input.samples:q} "
        "--acts-dir {params.acts_dir:q} --saes-dir {params.saes_dir:q} --out-dir {params.out_dir:q} "
        "--threads {threads} --no-progress 3>&1 > {log:q} 2>&1"
