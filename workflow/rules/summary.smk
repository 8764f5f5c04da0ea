# results/summary.json: every cell and artifact, key numbers, and wall time per stage.


def summary_inputs(wildcards):
    files = {
        "models": [f"results/models/{m}" for m in MODELS],
        "samples": [f"results/data/{d}/samples.parquet" for d in DATA],
        "manifests": [m for cell in CELLS for m in manifests(cell.name)],
    }
    return files


BENCHMARKS = (
    [bench("prepare_model", m) for m in MODELS]
    + [bench("make_data", d) for d in DATA]
    + [bench("score_data", d) for d in DATA]
    + [bench("extract_activations", c.name) for c in CELLS]
)


rule summary:
    input:
        unpack(summary_inputs),
        benchmarks=BENCHMARKS,
    output:
        "results/summary.json",
    params:
        spec=spec(**config),
    log:
        "logs/summary/summary.log",
    shell:
        "sae-diff summary --spec {params.spec:q} --results results "
        "--benchmarks {input.benchmarks} --out {output} > {log} 2>&1"
