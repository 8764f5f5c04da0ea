# SAE diffs: the seed-pair calibration of the base cell, labelled diffs of cell pairs, and the
# evolution of features along each branch.


rule train_seed_sae:
    """The calibration partner of each base-cell SAE: same config and data, other seeds."""
    input:
        unpack(lambda w: streaming_inputs(w, "M0", "D0")),
        acts=manifests("M0_D0"),
    output:
        [grid.seed_sae_weights("{layer}", name) for name in DIFF_SAES],
    log:
        "logs/train_seed_sae/layer{layer}.log",
    benchmark:
        bench("train_seed_sae", "layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(saes=seed_pair_saes(), training=seed_pair_training(), **placement()),
        stream=lambda w: streaming_args(w, "M0", "D0"),
        acts_dir=lambda w: grid.activations_dir("M0_D0"),  # holds the manifests listed as input
        out_dir=grid.seed_saes_dir("{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff train --spec {params.spec:q} --model M0 --data D0 --layer {wildcards.layer} "
        "--acts-dir {params.acts_dir:q} --out-dir {params.out_dir:q} {params.stream} "
        "--threads {threads} --no-progress 3>&1 > {log:q} 2>&1"


rule calibrate:
    input:
        saes=lambda w: base_sae_weights(w, DIFF_SAES),
        seed=[grid.seed_sae_weights("{layer}", name) for name in DIFF_SAES],
    output:
        [grid.calibration_json("{layer}", name) for name in DIFF_SAES],
    log:
        "logs/calibrate/layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, diff=config["diff"]),
        saes=grid.saes_dir("M0_D0", "{layer}"),
        seed=lambda w: grid.seed_saes_dir(w.layer),  # holds the seed SAEs listed as input
        out_dir=grid.calibration_dir("{layer}"),
    shell:
        "sae-diff calibrate --spec {params.spec:q} --layer {wildcards.layer} --saes {params.saes:q} "
        "--seed-saes {params.seed:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule diff_saes:
    input:
        unpack(pair_inputs),
    output:
        [grid.diff_json("{a}", "{b}", "{layer}", name) for name in DIFF_SAES],
    log:
        "logs/diff_saes/{a}__{b}_layer{layer}.log",
    benchmark:
        bench("diff_saes", "{a}__{b}_layer{layer}")
    wildcard_constraints:
        a=r"M\d+_D\d+",
        b=r"M\d+_D\d+",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, diff=config["diff"]),
        a_saes=grid.saes_dir("{a}", "{layer}"),
        b_saes=grid.saes_dir("{b}", "{layer}"),
        a_features=grid.features_dir("{a}", "{layer}"),
        b_features=grid.features_dir("{b}", "{layer}"),
        calibration=grid.calibration_dir("{layer}"),
        out_dir=grid.diff_dir("{a}", "{b}", "{layer}"),
    shell:
        "sae-diff diff --spec {params.spec:q} --a {wildcards.a} --b {wildcards.b} --layer {wildcards.layer} "
        "--a-saes {params.a_saes:q} --b-saes {params.b_saes:q} "
        "--a-features {params.a_features:q} --b-features {params.b_features:q} "
        "--calibration {params.calibration:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule evolution:
    input:
        unpack(evolution_inputs),
    output:
        [grid.evolution_json("{layer}", name) for name in DIFF_SAES],
        [grid.evolution_lineages("{layer}", name, b) for name in DIFF_SAES for b in config["grid"]["branches"]],
    log:
        "logs/evolution/layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, grid=config["grid"], data=config["data"]),
        out_dir=grid.evolution_dir("{layer}"),
    shell:
        "sae-diff evolution --spec {params.spec:q} --layer {wildcards.layer} --diffs {input.diffs:q} "
        "--calibration {input.calibration:q} --saes {input.saes:q} --stats {input.stats:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
