# The static feature dashboard (docs/dashboard.md): one document per SAE, then one self-contained
# page that holds them all (it opens from disk and inside the Snakemake report).
# A style change (the page template) reruns only rule dashboard; a stage's new table reruns the
# documents that read it.


DASHBOARD_TEMPLATE = str(Path(workflow.basedir) / "src" / "sae_diff" / "templates" / "dashboard.html")


rule dashboard_sae:
    input:
        unpack(dashboard_sae_inputs),
    output:
        grid.dashboard_data("{model}_{data}", "{layer}", "{sae}"),
    log:
        "logs/dashboard/{model}_{data}_layer{layer}_{sae}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(dashboard=config["dashboard"], figure_links=dashboard_figure_links(w)),
        features_dir=lambda w, input: os.path.dirname(input.features),
        named=lambda w, input: dashboard_named_args(input),
    shell:
        "sae-diff dashboard-sae --spec {params.spec:q} --cell {wildcards.model}_{wildcards.data} "
        "--layer {wildcards.layer} --sae {wildcards.sae} --features-dir {params.features_dir:q} {params.named} "
        "--out {output:q} > {log:q} 2>&1"


rule dashboard:
    input:
        saes=dashboard_targets(),
        template=DASHBOARD_TEMPLATE,
    output:
        report(
            grid.dashboard_index(),
            category="Dashboard",
            caption="../report/dashboard.rst",
        ),
    log:
        "logs/dashboard/index.log",
    conda:
        "../envs/analysis.yaml"
    params:
        # the template's content: a style change reruns this job (Snakemake does not rerun for a
        # source file that only got newer; params it compares)
        template_sha256=hashlib.sha256(Path(DASHBOARD_TEMPLATE).read_bytes()).hexdigest(),
    shell:
        "sae-diff dashboard --saes {input.saes:q} --out {output:q} > {log:q} 2>&1"
