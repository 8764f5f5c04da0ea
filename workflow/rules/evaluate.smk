# Evaluation of every SAE of a (cell, layer) on the cell's eval split (the model loads once).


rule evaluate_saes:
    input:
        saes=lambda w: [
            f"{cfglib.sae_dir(cfglib.Cell(w.model, w.data), int(w.layer), n)}/sae_weights.safetensors" for n in SAES
        ],
        acts=lambda w: manifests(f"{w.model}_{w.data}"),
        model="results/models/{model}",
        samples="results/data/{data}/raw.parquet",
    output:
        [f"results/eval/{{model}}_{{data}}/layer{{layer}}/{name}.json" for name in SAES],
        [f"results/eval/{{model}}_{{data}}/layer{{layer}}/{name}.loss_by_position.parquet" for name in SAES],
    log:
        "logs/evaluate_saes/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("evaluate_saes", "{model}_{data}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            saes=config["saes"], evaluation=config["evaluation"], activations=config["activations"], **placement()
        ),
        out_dir="results/eval/{model}_{data}/layer{layer}",
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff evaluate --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --model-dir {input.model:q} --samples {input.samples:q} "
        "--threads {threads} --out-dir {params.out_dir:q} 3>&1 > {log:q} 2>&1"
