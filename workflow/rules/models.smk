# M0..MX as safetensors HF folders: converted once, or made by a DPO round of the iterations block.


rule prepare_model:
    input:
        init_from=init_model_input,
    output:
        directory(grid.model_dir("{model}")),
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        bench("prepare_model", "{model}")
    wildcard_constraints:
        model=one_of(PREPARED_MODELS),
    priority: 10  # the iterations chain is the critical path: run it before per-cell work
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        spec=lambda w: spec(models={w.model: config["models"][w.model]}),
        source=model_source,  # a user's model folder edited in place reruns its conversion
        init_from=lambda w, input: f"--init-from {shlex.quote(input.init_from[0])}" if input.init_from else "",
    shell:
        "sae-diff prepare-model --spec {params.spec:q} --model {wildcards.model} {params.init_from} "
        "--threads {threads} --out {output:q} > {log:q} 2>&1"


rule finetune_dpo:
    input:
        unpack(dpo_inputs),
    output:
        directory(grid.model_dir("{model}")),
    log:
        "logs/finetune_dpo/{model}.log",
    benchmark:
        bench("finetune_dpo", "{model}")
    wildcard_constraints:
        model=one_of(DPO_MODELS),
    priority: 10  # the iterations chain is the critical path: run it before per-cell work
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(models={w.model: config["models"][w.model]}, iterations=config["iterations"], **placement()),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff finetune --spec {params.spec:q} --model {wildcards.model} "
        "--parent {input.parent:q} --reference {input.reference:q} --samples {input.samples:q} "
        "--threads {threads} --no-progress --out {output:q} 3>&1 > {log:q} 2>&1"
