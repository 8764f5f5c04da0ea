# Figures: one rule per kind, fed by the stage tables. Each rule's params carry only its own
# `figures.<kind>` block, so a style change reruns that kind's figures and nothing upstream.


rule figure_iterations:
    input:
        grid.iterations_json(),
    output:
        report(grid.figure("iterations"), category="Iterations", caption="../report/iterations.rst"),
    log:
        "logs/figures/iterations.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("iterations"),
    shell:
        "sae-diff figure iterations --spec {params.spec:q} --input iterations={input:q} --out {output:q} > {log:q} 2>&1"


rule figure_statistics:
    input:
        grid.feature_stats("{cell}", "{layer}", "{sae}"),
    output:
        report(
            grid.figure("statistics"),
            category="Features",
            subcategory="layer {layer}",
            caption="../report/statistics.rst",
        ),
    log:
        "logs/figures/statistics/{cell}_layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("statistics"),
        title="{sae} SAE on {cell}, layer {layer}: feature statistics",
    shell:
        "sae-diff figure statistics --spec {params.spec:q} --input features=$(dirname {input:q}) "
        "--title {params.title:q} --out {output:q} > {log:q} 2>&1"


rule figure_bias:
    input:
        stats=grid.feature_stats("{cell}", "{layer}", "{sae}"),
        samples=cell_samples,
    output:
        report(
            grid.figure("bias"),
            category="Features",
            subcategory="layer {layer}",
            caption="../report/bias.rst",
        ),
    log:
        "logs/figures/bias/{cell}_layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(figure=config["figures"]["bias"], features=config["features"]),
        title="{sae} SAE on {cell}, layer {layer}: features by group effect size",
    shell:
        "sae-diff figure bias --spec {params.spec:q} --input features=$(dirname {input.stats:q}) "
        "--input samples={input.samples:q} --title {params.title:q} --out {output:q} > {log:q} 2>&1"


rule figure_embeddings:
    input:
        stats=grid.feature_stats("{cell}", "{layer}", "{sae}"),
        samples=cell_samples,
    output:
        report(
            grid.figure("embeddings"),
            category="Features",
            subcategory="layer {layer}",
            caption="../report/embeddings.rst",
        ),
    log:
        "logs/figures/embeddings/{cell}_layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(figure=config["figures"]["embeddings"], features=config["features"]),
        title="{sae} SAE on {cell}, layer {layer}: samples in feature space",
    shell:
        "sae-diff figure embeddings --spec {params.spec:q} --input features=$(dirname {input.stats:q}) "
        "--input samples={input.samples:q} --title {params.title:q} --out {output:q} > {log:q} 2>&1"


rule figure_coactivation:
    input:
        grid.feature_stats("{cell}", "{layer}", "{sae}"),
    output:
        full=report(
            grid.figure("coactivation"),
            category="Co-activation",
            subcategory="layer {layer}",
            caption="../report/coactivation.rst",
        ),
        top=report(
            grid.figure("coactivation_top"),
            category="Co-activation",
            subcategory="layer {layer}",
            caption="../report/coactivation.rst",
        ),
    log:
        "logs/figures/coactivation/{cell}_layer{layer}_{sae}_{column}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(figure=config["figures"]["coactivation"], column=w.column),
        title="{sae} SAE on {cell}, layer {layer}: mean activation by {column}",
    shell:
        "(sae-diff figure coactivation --spec {params.spec:q} --input features=$(dirname {input:q}) "
        "--title {params.title:q} --out {output.full:q} && "
        "sae-diff figure coactivation_top --spec {params.spec:q} --input features=$(dirname {input:q}) "
        "--title {params.title:q} --out {output.top:q}) > {log:q} 2>&1"


rule figure_coactivation_layers:
    input:
        [grid.feature_stats("{cell}", layer, "{sae}") for layer in config["layers"]],
    output:
        report(
            grid.figure("coactivation_layers"),
            category="Co-activation",
            subcategory="across layers",
            caption="../report/coactivation.rst",
        ),
    log:
        "logs/figures/coactivation_layers/{cell}_{sae}_{column}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(figure=config["figures"]["coactivation_layers"], column=w.column),
        panels=layer_panels,
        title="{sae} SAE on {cell}: mean activation by {column} across layers",
    shell:
        "sae-diff figure coactivation_layers --spec {params.spec:q} {params.panels} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_evolution:
    input:
        grid.evolution_json("{layer}", "{sae}"),
    output:
        report(
            grid.figure("evolution"),
            category="Evolution",
            subcategory="layer {layer}",
            caption="../report/evolution.rst",
        ),
    log:
        "logs/figures/evolution/layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("evolution"),
    shell:
        "sae-diff figure evolution --spec {params.spec:q} --input evolution={input:q} --out {output:q} > {log:q} 2>&1"


rule figure_similarity:
    input:
        diffs=branch_diff_jsons,
        calibration=grid.calibration_json("{layer}", "{sae}"),
    output:
        report(
            grid.figure("similarity"),
            category="Evolution",
            subcategory="layer {layer}",
            caption="../report/similarity.rst",
        ),
    log:
        "logs/figures/similarity/layer{layer}_{sae}_{branch}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("similarity"),
        panels=step_panels,
        null=lambda w, input: str(Path(input.calibration).with_name(f"{w.sae}_null.parquet")),
        title="{sae} SAE, layer {layer}, branch {branch}: matched decoder cosine per step",
    shell:
        "sae-diff figure similarity --spec {params.spec:q} {params.panels} --input null={params.null:q} "
        "--input thresholds={input.calibration:q} --title {params.title:q} --out {output:q} > {log:q} 2>&1"


rule figure_probe_auroc:
    input:
        grid.probe_comparison("{layer}"),
    output:
        report(
            grid.figure("probe_auroc"),
            category="Probes",
            subcategory="layer {layer}",
            caption="../report/probe_auroc.rst",
        ),
    log:
        "logs/figures/probe_auroc/layer{layer}_{sae}_{metric}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(
            figure=config["figures"]["probe_auroc"],
            sae=w.sae,
            metric=w.metric,
            branches={b: [c.name for c in grid.branch_cells(config, b)] for b in config["grid"]["branches"]},
        ),
        title="{sae} SAE, layer {layer}: probes of {metric}",
    shell:
        "sae-diff figure probe_auroc --spec {params.spec:q} --input comparison={input:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_probe_importance:
    input:
        grid.probe_json("{cell}", "{layer}", "{sae}", "{metric}"),
    output:
        report(
            grid.figure("probe_importance"),
            category="Probes",
            subcategory="layer {layer}",
            caption="../report/probe_importance.rst",
        ),
    log:
        "logs/figures/probe_importance/{cell}_layer{layer}_{sae}_{metric}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("probe_importance"),
        title="{sae} SAE on {cell}, layer {layer}: importance for {metric}",
    shell:
        "sae-diff figure probe_importance --spec {params.spec:q} --input probe={input:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_probe_overlap:
    input:
        grid.probe_comparison("{layer}"),
    output:
        report(
            grid.figure("probe_overlap"),
            category="Probes",
            subcategory="layer {layer}",
            caption="../report/probe_overlap.rst",
        ),
    log:
        "logs/figures/probe_overlap/layer{layer}_{sae}_{metric}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(
            figure=config["figures"]["probe_overlap"], sae=w.sae, metric=w.metric, cells=[c.name for c in CELLS]
        ),
        title="{sae} SAE, layer {layer}: overlap of the top features for {metric}",
    shell:
        "sae-diff figure probe_overlap --spec {params.spec:q} --input comparison={input:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_dose_response:
    input:
        f"{grid.intervention_dir('{experiment}', '{cell}', '{layer}', '{sae}', '{metric}')}/effects.json",
    output:
        report(
            grid.figure("dose_response"),
            category="Interventions",
            subcategory="{experiment}, layer {layer}",
            caption="../report/dose_response.rst",
        ),
    log:
        "logs/figures/dose_response/{experiment}_{cell}_layer{layer}_{sae}_{metric}.log",
    wildcard_constraints:
        experiment="ablation|steering|clamping",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("dose_response"),
        title="{experiment} with the top {metric} features of the {sae} SAE on {cell}, layer {layer}",
    shell:
        "sae-diff figure dose_response --spec {params.spec:q} --input effects={input:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_training:
    input:
        grid.sae_weights("{cell}", "{layer}", "{sae}"),
    output:
        report(
            grid.figure("training"),
            category="SAE training",
            subcategory="layer {layer}",
            caption="../report/training.rst",
        ),
    log:
        "logs/figures/training/{cell}_layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("training"),
        log=lambda w, input: str(Path(input[0]).with_name("train_log.jsonl")),  # written with the weights
        title="{sae} SAE on {cell}, layer {layer}: training",
    shell:
        "sae-diff figure training --spec {params.spec:q} --input log={params.log:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_density:
    input:
        grid.eval_json("{cell}", "{layer}", "{sae}"),
    output:
        report(
            grid.figure("density"),
            category="Evaluation",
            subcategory="layer {layer}",
            caption="../report/density.rst",
        ),
    log:
        "logs/figures/density/{cell}_layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("density"),
        title="{sae} SAE on {cell}, layer {layer}: feature density (eval tokens)",
    shell:
        "sae-diff figure density --spec {params.spec:q} --input eval={input:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_loss_by_position:
    input:
        table=grid.eval_loss_by_position("{cell}", "{layer}", "{sae}"),
        eval=grid.eval_json("{cell}", "{layer}", "{sae}"),
    output:
        report(
            grid.figure("loss_by_position"),
            category="Evaluation",
            subcategory="layer {layer}",
            caption="../report/loss_by_position.rst",
        ),
    log:
        "logs/figures/loss_by_position/{cell}_layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("loss_by_position"),
        title="{sae} SAE on {cell}, layer {layer}: next-token loss over context length",
    shell:
        "sae-diff figure loss_by_position --spec {params.spec:q} --input table={input.table:q} --input eval={input.eval:q} "
        "--title {params.title:q} --out {output:q} > {log:q} 2>&1"


rule figure_diffing:
    """Every same-token method of one pair and layer on one page."""
    input:
        unpack(diffing_figure_inputs),
    output:
        report(
            grid.figure("diffing", pair=SAME_TOKEN_PAIR),
            category="Same-token diffing",
            subcategory="layer {layer}",
            caption="../report/diffing.rst",
        ),
    log:
        "logs/figures/diffing/M{i}_layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=figure_spec("diffing"),
        inputs=lambda w, input: " ".join(f"--input {key}={shlex.quote(input[key])}" for key in input.keys()),
        title="M{i} against M0 on D{i}, layer {layer}: same-token diffing",
    shell:
        "sae-diff figure diffing --spec {params.spec:q} {params.inputs} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"
