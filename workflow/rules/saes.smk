# SAEs per (cell, layer): every config in `saes` trained from one pass over the cell's activations.


rule train_sae:
    input:
        unpack(streaming_inputs),
        acts=cell_manifests,
        warm=warm_start_inputs,
    output:
        [grid.sae_weights("{model}_{data}", "{layer}", name) for name in TRAINED_SAES],
    log:
        "logs/train_sae/{model}_{data}_layer{layer}.log",
    benchmark:
        bench("train_sae", "{model}_{data}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
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
        acts_dir=grid.activations_dir("{model}_{data}"),
        out_dir=grid.saes_dir("{model}_{data}", "{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff train --spec {params.spec:q} --model {wildcards.model} --data {wildcards.data} "
        "--layer {wildcards.layer} --acts-dir {params.acts_dir:q} --out-dir {params.out_dir:q} {params.stream} "
        "--threads {threads} 3>&1 > {log:q} 2>&1"


rule import_sae:
    input:
        pretrained_sae_source,
    output:
        grid.sae_weights("{model}_{data}", "{layer}", "{sae}"),
    log:
        "logs/import_sae/{model}_{data}_layer{layer}_{sae}.log",
    wildcard_constraints:
        sae="|".join(PRETRAINED_SAES) or "(?!x)x",
    conda:
        "../envs/analysis.yaml"
    params:
        format=lambda w: config["saes"][w.sae].get("format", "auto"),
        transcoder=lambda w: "--transcoder" if config["saes"][w.sae].get("transcoder") else "",
        out_dir=grid.sae_dir("{model}_{data}", "{layer}", "{sae}"),
    shell:
        "sae-diff import-sae --path {input:q} --format {params.format:q} {params.transcoder} "
        "--out {params.out_dir:q} > {log:q} 2>&1"
