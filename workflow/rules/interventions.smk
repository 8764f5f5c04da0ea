# Causal tests: each cell's top features (by probe, or by fork attribution), ablated in the
# iteration's model and steered into the base model during generation, against no-op, random
# and sign-flipped controls.


rule attribute:
    """Fork attribution: which of a cell's SAE features the cell's model uses where two of its
    completions of one prompt part ways on the metric."""
    input:
        model=lambda w: f"results/models/{cfglib.Cell.parse(w.cell).model}",
        samples=lambda w: f"results/data/{cfglib.Cell.parse(w.cell).data}/samples.parquet",
        sae="results/saes/{cell}/layer{layer}/{sae}/sae_weights.safetensors",
    output:
        table="results/attribution/{cell}/layer{layer}/{sae}/{metric}.parquet",
        summary="results/attribution/{cell}/layer{layer}/{sae}/{metric}.json",
    log:
        "logs/attribute/{cell}_layer{layer}_{sae}_{metric}.log",
    benchmark:
        bench("attribute", "{cell}_layer{layer}_{sae}_{metric}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            interventions={
                "attribution": config["interventions"]["attribution"],
                "seed": config["interventions"]["seed"],
            },
            direction=cfglib.metric_direction(config, w.metric),
            hook_point=config["saes"][w.sae].get("hook_point", "resid_post"),
            **placement(),
        ),
        sae_dir=lambda w, input: str(Path(input.sae).parent),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff attribute --spec {params.spec:q} --layer {wildcards.layer} --metric {wildcards.metric} "
        "--model-dir {input.model:q} --samples {input.samples:q} --sae-dir {params.sae_dir:q} --out {output.table:q} "
        "--threads {threads} --no-progress 3>&1 > {log:q} 2>&1"


rule intervene:
    input:
        model=lambda w: f"results/models/{intervention_run(w).model}",
        base="results/models/M0",
        sae=lambda w: f"results/saes/{w.cell}/layer{w.layer}/{w.sae}/sae_weights.safetensors",
        probe="results/probes/{cell}/layer{layer}/{sae}/{metric}.json",
        stats="results/features/{cell}/layer{layer}/{sae}/stats.parquet",
        attribution=lambda w: (
            [f"results/attribution/{w.cell}/layer{w.layer}/{w.sae}/{w.metric}.parquet"]
            if selected_by(w.experiment) == "attribution"
            else []
        ),
    output:
        generations="results/interventions/{experiment}/{cell}/layer{layer}/{sae}/{metric}/generations.parquet",
        scores="results/interventions/{experiment}/{cell}/layer{layer}/{sae}/{metric}/scores.parquet",
        effects="results/interventions/{experiment}/{cell}/layer{layer}/{sae}/{metric}/effects.json",
    log:
        "logs/intervene/{experiment}_{cell}_layer{layer}_{sae}_{metric}.log",
    benchmark:
        bench("intervene", "{experiment}_{cell}_layer{layer}_{sae}_{metric}")
    wildcard_constraints:
        experiment="ablation|steering|clamping",
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=intervention_spec,
        out_dir=lambda w, output: str(Path(output.effects).parent),
        sae_dir=lambda w, input: str(Path(input.sae).parent),
        model=lambda w: intervention_run(w).model,
        attribution=lambda w, input: f"--attribution {shlex.quote(str(input.attribution))}" if input.attribution else "",
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff intervene --spec {params.spec:q} --experiment {wildcards.experiment} --cell {wildcards.cell} "
        "--layer {wildcards.layer} --sae {wildcards.sae} --metric {wildcards.metric} "
        "--model {params.model:q} --model-dir {input.model:q} --base-dir {input.base:q} --sae-dir {params.sae_dir:q} "
        "--probe {input.probe:q} --stats {input.stats:q} {params.attribution} --out-dir {params.out_dir:q} "
        "--threads {threads} --no-progress 3>&1 > {log:q} 2>&1"
