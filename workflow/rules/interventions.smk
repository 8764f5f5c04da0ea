# Causal tests: each cell's top features (by probe, or by fork attribution), ablated in the
# iteration's model and steered into the base model during generation, against no-op, random
# and sign-flipped controls.


rule prompt_split:
    """The causal tests' prompts split once, before anything selects: feature selection (probes,
    attribution), condition selection and report (sae_diff.splits)."""
    input:
        prompts=prompt_files,
    output:
        grid.prompt_split(),
    log:
        "logs/prompt_split.log",
    conda:
        "../envs/analysis.yaml"
    params:
        # only what the split depends on: another alpha or null size must not re-split (and rerun the probes)
        spec=lambda w: spec(
            interventions={k: config["interventions"].get(k) for k in ("split", "seed", "max_prompts")},
            sources=grid.split_sources(config),
        ),
    shell:
        "sae-diff prompt-split --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"


rule attribute:
    """Fork attribution: which of a cell's SAE features the cell's model uses where two of its
    completions of one prompt part ways on the metric."""
    input:
        model=cell_model,
        samples=cell_samples,
        sae=grid.sae_weights("{cell}", "{layer}", "{sae}"),
        split=grid.prompt_split(),
    output:
        table=grid.attribution_table("{cell}", "{layer}", "{sae}", "{metric}"),
        summary=grid.attribution_summary("{cell}", "{layer}", "{sae}", "{metric}"),
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
                "attribution": {k: v for k, v in config["interventions"]["attribution"].items() if k != "rank_by"},
                "seed": config["interventions"]["seed"],
            },
            # positions left out of the attribution sums and the ablation check, as in SAE training
            masking={k: config["activations"][k] for k in ("exclude_first_position", "exclude_special_tokens")},
            direction=grid.metric_direction(config, w.metric),
            hook_point=config["saes"][w.sae].get("hook_point", "resid_post"),
            **placement(),
        ),
        sae_dir=lambda w, input: str(Path(input.sae).parent),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff attribute --spec {params.spec:q} --layer {wildcards.layer} --metric {wildcards.metric} "
        "--model-dir {input.model:q} --samples {input.samples:q} --prompt-split {input.split:q} "
        "--sae-dir {params.sae_dir:q} --out {output.table:q} "
        "--threads {threads} --no-progress 3>&1 > {log:q} 2>&1"


rule intervene:
    input:
        model=intervention_model,
        base=grid.model_dir("M0"),
        sae=grid.sae_weights("{cell}", "{layer}", "{sae}"),
        probe=grid.probe_json("{cell}", "{layer}", "{sae}", "{metric}"),
        stats=grid.feature_stats("{cell}", "{layer}", "{sae}"),
        attribution=attribution_input,
        split=grid.prompt_split(),
        diffmean=grid.probe_diffmean("{cell}", "{layer}", "{sae}", "{metric}"),
        adl=intervention_adl_input,
        crosscoder=intervention_crosscoder_input,
        diff_sae=intervention_diff_sae_input,
    output:
        generations=f"{grid.intervention_dir('{experiment}', '{cell}', '{layer}', '{sae}', '{metric}')}/generations.parquet",
        scores=f"{grid.intervention_dir('{experiment}', '{cell}', '{layer}', '{sae}', '{metric}')}/scores.parquet",
        effects=f"{grid.intervention_dir('{experiment}', '{cell}', '{layer}', '{sae}', '{metric}')}/effects.json",
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
        adl=lambda w, input: f"--adl {shlex.quote(str(input.adl))}" if input.adl else "",
        # the crosscoder's run folder: the latents table's folder
        crosscoder=lambda w, input: (
            f"--crosscoder {shlex.quote(os.path.dirname(input.crosscoder[1]))}" if input.crosscoder else ""
        ),
        diff_sae=lambda w, input: (
            f"--diff-sae {shlex.quote(os.path.dirname(input.diff_sae[0]))}" if input.diff_sae else ""
        ),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff intervene --spec {params.spec:q} --experiment {wildcards.experiment} --cell {wildcards.cell} "
        "--layer {wildcards.layer} --sae {wildcards.sae} --metric {wildcards.metric} "
        "--model {params.model:q} --model-dir {input.model:q} --base-dir {input.base:q} --sae-dir {params.sae_dir:q} "
        "--probe {input.probe:q} --stats {input.stats:q} {params.attribution} --prompt-split {input.split:q} "
        "--diffmean {input.diffmean:q} {params.adl} {params.crosscoder} {params.diff_sae} --out-dir {params.out_dir:q} "
        "--threads {threads} --no-progress 3>&1 > {log:q} 2>&1"
