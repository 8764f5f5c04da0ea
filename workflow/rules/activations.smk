# Activations per (model, data) cell: every configured (layer, hook point) in one forward pass.


rule extract_activations:
    input:
        model=grid.model_dir("{model}"),
        # unscored samples: a scorer change must not re-extract activations
        samples=grid.raw_samples("{data}"),
    output:
        [grid.manifest("{model}_{data}", site) for site in SITES],
    log:
        "logs/extract_activations/{model}_{data}.log",
    benchmark:
        bench("extract_activations", "{model}_{data}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            layers=config["layers"],
            hook_points=config["hook_points"],
            activations=config["activations"],
            **placement(),
        ),
        out_dir=grid.activations_dir("{model}_{data}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff extract --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--model-dir {input.model:q} --samples {input.samples:q} --out-dir {params.out_dir:q} "
        "--threads {threads} 3>&1 > {log:q} 2>&1"
