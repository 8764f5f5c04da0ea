# Figures: one rule per kind, fed by the stage tables. Each rule's params carry only its own
# `figures.<kind>` block, so a style change reruns that kind's figures and nothing upstream.


rule figure_iterations:
    input:
        "results/iterations.json",
    output:
        report(
            "results/figures/iterations/target_metric.png", category="Iterations", caption="../report/iterations.rst"
        ),
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
        "results/features/{cell}/layer{layer}/{sae}/stats.parquet",
    output:
        report(
            "results/figures/features/{cell}/layer{layer}/{sae}/statistics.png",
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
        stats="results/features/{cell}/layer{layer}/{sae}/stats.parquet",
        samples=lambda w: f"results/data/{cfglib.Cell.parse(w.cell).data}/samples.parquet",
    output:
        report(
            "results/figures/features/{cell}/layer{layer}/{sae}/bias.png",
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
        stats="results/features/{cell}/layer{layer}/{sae}/stats.parquet",
        samples=lambda w: f"results/data/{cfglib.Cell.parse(w.cell).data}/samples.parquet",
    output:
        report(
            "results/figures/features/{cell}/layer{layer}/{sae}/embeddings.png",
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
        "results/features/{cell}/layer{layer}/{sae}/stats.parquet",
    output:
        full=report(
            "results/figures/features/{cell}/layer{layer}/{sae}/coactivation_{column}.png",
            category="Co-activation",
            subcategory="layer {layer}",
            caption="../report/coactivation.rst",
        ),
        top=report(
            "results/figures/features/{cell}/layer{layer}/{sae}/coactivation_{column}_top.png",
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
        [f"results/features/{{cell}}/layer{layer}/{{sae}}/stats.parquet" for layer in config["layers"]],
    output:
        report(
            "results/figures/features/{cell}/{sae}_coactivation_{column}_layers.png",
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
        panels=lambda w, input: input_args(
            (f"layer{layer}", Path(path).parent) for layer, path in zip(config["layers"], input)
        ),
        title="{sae} SAE on {cell}: mean activation by {column} across layers",
    shell:
        "sae-diff figure coactivation_layers --spec {params.spec:q} {params.panels} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_evolution:
    input:
        "results/evolution/layer{layer}/{sae}.json",
    output:
        report(
            "results/figures/evolution/layer{layer}/{sae}_counts.png",
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
        diffs=lambda w: [
            f"results/diff/{cfglib.pair_name(a, b)}/layer{w.layer}/{w.sae}.json" for a, b in branch_steps(w.branch)
        ],
        calibration="results/calibration/layer{layer}/{sae}.json",
    output:
        report(
            "results/figures/evolution/layer{layer}/{sae}_similarity_{branch}.png",
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
        panels=lambda w, input: input_args(
            (f"{a.name}→{b.name}", Path(path).with_suffix(".parquet"))
            for (a, b), path in zip(branch_steps(w.branch), input.diffs)
        ),
        null="results/calibration/layer{layer}/{sae}_null.parquet",
        title="{sae} SAE, layer {layer}, branch {branch}: matched decoder cosine per step",
    shell:
        "sae-diff figure similarity --spec {params.spec:q} {params.panels} --input null={params.null:q} "
        "--input thresholds={input.calibration:q} --title {params.title:q} --out {output:q} > {log:q} 2>&1"


rule figure_probe_auroc:
    input:
        "results/probes/comparison_layer{layer}.json",
    output:
        report(
            "results/figures/probes/layer{layer}/{sae}_{metric}_auroc.png",
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
            branches={b: [c.name for c in cfglib.branch_cells(config, b)] for b in config["grid"]["branches"]},
        ),
        title="{sae} SAE, layer {layer}: probes of {metric}",
    shell:
        "sae-diff figure probe_auroc --spec {params.spec:q} --input comparison={input:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_probe_importance:
    input:
        "results/probes/{cell}/layer{layer}/{sae}/{metric}.json",
    output:
        report(
            "results/figures/probes/{cell}/layer{layer}/{sae}_{metric}_importance.png",
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
        "results/probes/comparison_layer{layer}.json",
    output:
        report(
            "results/figures/probes/layer{layer}/{sae}_{metric}_overlap.png",
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
        "results/interventions/{experiment}/{cell}/layer{layer}/{sae}/{metric}/effects.json",
    output:
        report(
            "results/figures/interventions/{experiment}/{cell}/layer{layer}/{sae}_{metric}.png",
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
        "results/saes/{cell}/layer{layer}/{sae}/sae_weights.safetensors",
    output:
        report(
            "results/figures/saes/{cell}/layer{layer}/{sae}_training.png",
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
        log="results/saes/{cell}/layer{layer}/{sae}/train_log.jsonl",  # written with the weights
        title="{sae} SAE on {cell}, layer {layer}: training",
    shell:
        "sae-diff figure training --spec {params.spec:q} --input log={params.log:q} --title {params.title:q} "
        "--out {output:q} > {log:q} 2>&1"


rule figure_density:
    input:
        "results/eval/{cell}/layer{layer}/{sae}.json",
    output:
        report(
            "results/figures/eval/{cell}/layer{layer}/{sae}_density.png",
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
        table="results/eval/{cell}/layer{layer}/{sae}.loss_by_position.parquet",
        eval="results/eval/{cell}/layer{layer}/{sae}.json",
    output:
        report(
            "results/figures/eval/{cell}/layer{layer}/{sae}_loss_by_position.png",
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
