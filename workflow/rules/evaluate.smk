# Evaluation of every SAE of a (cell, layer) on the cell's eval split (the model loads once).


rule evaluate_saes:
    input:
        saes=cell_sae_weights,
        acts=cell_manifests,
        model=grid.model_dir("{model}"),
        samples=grid.raw_samples("{data}"),
    output:
        [grid.eval_json("{model}_{data}", "{layer}", name) for name in SAES],
        [grid.eval_loss_by_position("{model}_{data}", "{layer}", name) for name in SAES],
    log:
        "logs/evaluate_saes/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("evaluate_saes", "{model}_{data}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            saes=config["saes"], evaluation=config["evaluation"], activations=config["activations"], **placement()
        ),
        acts_dir=grid.activations_dir("{model}_{data}"),
        saes_dir=grid.saes_dir("{model}_{data}", "{layer}"),
        out_dir=grid.eval_dir("{model}_{data}", "{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff evaluate --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --model-dir {input.model:q} --samples {input.samples:q} "
        "--acts-dir {params.acts_dir:q} --saes-dir {params.saes_dir:q} "
        "--threads {threads} --out-dir {params.out_dir:q} 3>&1 > {log:q} 2>&1"
