# SAEs per (cell, layer): every config in `saes` trained from one pass over the cell's activations.


rule train_sae:
    input:
        acts=lambda w: manifests(f"{w.model}_{w.data}"),
        warm=warm_start_inputs,
    output:
        [f"results/saes/{{model}}_{{data}}/layer{{layer}}/{name}/sae_weights.safetensors" for name in SAES],
    params:
        spec=lambda w: spec(saes=config["saes"], training=config["training"], warm_start=warm_start_dirs(w)),
    conda:
        "../envs/torch.yaml"
    log:
        "logs/train_sae/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("train_sae", "{model}_{data}_layer{layer}")
    threads: 8
    resources:
        mem_mb=8000,
    shell:
        "sae-diff train --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --threads {threads} > {log} 2>&1"
