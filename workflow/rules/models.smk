# M0..MX as safetensors HF folders, converted once.


def init_model_input(wildcards):
    source = config["models"][wildcards.model].get("init_from")
    return [f"results/models/{source}"] if source else []


rule prepare_model:
    input:
        init_model_input,
    output:
        directory("results/models/{model}"),
    params:
        spec=lambda w: spec(models={w.model: config["models"][w.model]}),
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        bench("prepare_model", "{model}")
    threads: 2
    resources:
        mem_mb=4000,
    shell:
        "sae-diff prepare-model --spec {params.spec:q} --model {wildcards.model} "
        "--threads {threads} --out {output} > {log} 2>&1"
