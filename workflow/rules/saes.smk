# SAEs per (cell, layer): every config in `saes` trained from one pass over the cell's activations.


rule train_sae:
    input:
        unpack(streaming_inputs),
        acts=lambda w: manifests(f"{w.model}_{w.data}"),
        warm=warm_start_inputs,
    output:
        [f"results/saes/{{model}}_{{data}}/layer{{layer}}/{name}/sae_weights.safetensors" for name in TRAINED_SAES],
    log:
        "logs/train_sae/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("train_sae", "{model}_{data}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            saes={n: config["saes"][n] for n in TRAINED_SAES},
            training=config["training"],
            warm_start=warm_start_dirs(w),
            **placement(),
        ),
        stream=streaming_args,
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff train --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} {params.stream} --threads {threads} 3>&1 > {log:q} 2>&1"


rule import_sae:
    input:
        lambda w: config["saes"][w.sae]["path"].format(model=w.model, data=w.data, layer=w.layer),
    output:
        "results/saes/{model}_{data}/layer{layer}/{sae}/sae_weights.safetensors",
    log:
        "logs/import_sae/{model}_{data}_layer{layer}_{sae}.log",
    wildcard_constraints:
        sae="|".join(PRETRAINED_SAES) or "(?!x)x",
    conda:
        "../envs/analysis.yaml"
    params:
        format=lambda w: config["saes"][w.sae].get("format", "auto"),
        transcoder=lambda w: "--transcoder" if config["saes"][w.sae].get("transcoder") else "",
        out_dir="results/saes/{model}_{data}/layer{layer}/{sae}",
    shell:
        "sae-diff import-sae --path {input:q} --format {params.format:q} {params.transcoder} "
        "--out {params.out_dir:q} > {log:q} 2>&1"
