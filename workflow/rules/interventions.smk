# Causal tests: the probes' top features of each cell, ablated in the iteration's model and
# steered into the base model during generation, against no-op, random and sign-flipped controls.


rule intervene:
    input:
        model=lambda w: f"results/models/{intervention_run(w).model}",
        base="results/models/M0",
        sae=lambda w: f"results/saes/{w.cell}/layer{w.layer}/{w.sae}/sae_weights.safetensors",
        probe="results/probes/{cell}/layer{layer}/{sae}/{metric}.json",
        stats="results/features/{cell}/layer{layer}/{sae}/stats.parquet",
    output:
        generations="results/interventions/{experiment}/{cell}/layer{layer}/{sae}/{metric}/generations.parquet",
        scores="results/interventions/{experiment}/{cell}/layer{layer}/{sae}/{metric}/scores.parquet",
        effects="results/interventions/{experiment}/{cell}/layer{layer}/{sae}/{metric}/effects.json",
    params:
        spec=intervention_spec,
        out_dir=lambda w, output: str(Path(output.effects).parent),
        sae_dir=lambda w, input: str(Path(input.sae).parent),
        model=lambda w: intervention_run(w).model,
    wildcard_constraints:
        experiment="ablation|steering|clamping",
    conda:
        "../envs/torch.yaml"
    log:
        "logs/intervene/{experiment}_{cell}_layer{layer}_{sae}_{metric}.log",
    benchmark:
        bench("intervene", "{experiment}_{cell}_layer{layer}_{sae}_{metric}")
    threads: 8
    resources:
        mem_mb=8000,
    shell:
        "sae-diff intervene --spec {params.spec:q} --experiment {wildcards.experiment} --cell {wildcards.cell} "
        "--layer {wildcards.layer} --sae {wildcards.sae} --metric {wildcards.metric} "
        "--model {params.model} --model-dir {input.model} --base-dir {input.base} --sae-dir {params.sae_dir} "
        "--probe {input.probe} --stats {input.stats} --out-dir {params.out_dir} "
        "--threads {threads} --no-progress > {log} 2>&1"
