# results/summary.json: every cell and artifact, key numbers, and wall time per stage.


rule summary:
    input:
        unpack(summary_inputs),
        benchmarks=BENCHMARKS,
    output:
        json=grid.summary_json(),
        table=report(grid.summary_table(), category="Summary", caption="../report/summary_table.rst"),
        wandb=[grid.wandb_record()] if config["wandb"]["mode"] != "disabled" else [],
    log:
        "logs/summary/summary.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(**config, sae_order=SAES),  # JSON sorts keys; the headline follows config order
        wandb=lambda w, output: f"--wandb-out {shlex.quote(output.wandb[0])}" if output.wandb else "",
    shell:
        "sae-diff summary --spec {params.spec:q} "
        "--models {input.models:q} --samples {input.samples:q} --iterations {input.iterations:q} "
        "--evolution {input.evolution:q} --probes {input.probes:q} --interventions {input.interventions:q} "
        "--manifests {input.manifests:q} --saes {input.saes:q} --evals {input.evals:q} "
        "--features {input.features:q} --diffing {input.diffing:q} "
        "--benchmarks {input.benchmarks:q} --figures {input.figures:q} --table {output.table:q} "
        "{params.wandb} "
        "--out {output.json:q} > {log:q} 2>&1"
