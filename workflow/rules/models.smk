# M0..MX as safetensors HF folders, converted once.


rule prepare_model:
    input:
        init_model_input,
    output:
        directory("results/models/{model}"),
    params:
        spec=lambda w: spec(models={w.model: config["models"][w.model]}),
    conda:
        "../envs/torch.yaml"
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
