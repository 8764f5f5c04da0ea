# results/summary.json: every cell and artifact, key numbers, and wall time per stage.


rule summary:
    input:
        unpack(summary_inputs),
        benchmarks=BENCHMARKS,
    output:
        "results/summary.json",
    params:
        spec=lambda w: spec(**config),
    conda:
        "../envs/analysis.yaml"
    log:
        "logs/summary/summary.log",
    shell:
        "sae-diff summary --spec {params.spec:q} --results results "
        "--benchmarks {input.benchmarks} --out {output} > {log} 2>&1"
