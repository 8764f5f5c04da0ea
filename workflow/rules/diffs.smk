# SAE diffs: the seed-pair calibration of the base cell, labelled diffs of cell pairs, and the
# evolution of features along each branch.


rule train_seed_sae:
    """The calibration partner of each base-cell SAE: same config and data, other seeds."""
    input:
        unpack(lambda w: streaming_inputs(w, "M0", "D0")),
        acts=manifests("M0_D0"),
    output:
        seed_pair_outputs("{layer}"),
    log:
        "logs/train_seed_sae/layer{layer}.log",
    benchmark:
        bench("train_seed_sae", "layer{layer}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
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
        seed=seed_pair_outputs("{layer}"),
        null=lambda w: null_cosines(w.layer) if THRESHOLDS_FROM_RESAMPLING else [],
        # which base-cell features fire: the seed pair's changed fraction counts only those
        stats=lambda w: [grid.feature_stats("M0_D0", w.layer, n) for n in sorted(DIFF_SAES)],
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
        # sorted: reordering the config's saes must not change the params (and rerun the diffs)
        cross_init=lambda w: [
            f"{n}={grid.cross_init_sae_dir(w.layer, n, config['diff']['vary'])}" for n in sorted(DIFF_SAES)
        ],
        null_dir=lambda w: f"--null-dir {shlex.quote(grid.null_dir(w.layer))}" if THRESHOLDS_FROM_RESAMPLING else "",
        stats=lambda w: [f"{n}={grid.feature_stats('M0_D0', w.layer, n)}" for n in sorted(DIFF_SAES)],
        out_dir=grid.calibration_dir("{layer}"),
    shell:
        "sae-diff calibrate --spec {params.spec:q} --layer {wildcards.layer} --saes {params.saes:q} "
        "--seed-saes {params.seed:q} --cross-init {params.cross_init:q} {params.null_dir} --stats {params.stats:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule train_null_saes:
    """The data-resampling null: each diffed SAE config trained on both halves of random prompt
    splits of the base cell's training data, as the cells' SAEs are (nulls.train_pairs)."""
    input:
        unpack(lambda w: streaming_inputs(w, "M0", "D0")),
        acts=manifests("M0_D0"),
        samples=grid.samples("D0"),
        warm=lambda w: [f"{d}/sae_weights.safetensors" for d in null_warm_start(w).values()],
    output:
        null_sae_outputs("{layer}"),
    log:
        "logs/train_null_saes/layer{layer}.log",
    benchmark:
        bench("train_null_saes", "layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            saes=null_saes(w), training=config["training"], warm_start=null_warm_start(w), **placement()
        ),
        stream=lambda w: streaming_args(w, "M0", "D0"),
        acts_dir=lambda w: grid.activations_dir("M0_D0"),
        pairs=config["diff"]["resampling"]["pairs"],
        split_seed=config["diff"]["resampling"]["seed"],
        out_dir=grid.null_dir("{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff train-null --spec {params.spec:q} --model M0 --data D0 --layer {wildcards.layer} "
        "--acts-dir {params.acts_dir:q} --samples {input.samples:q} --pairs {params.pairs} --split-seed {params.split_seed} "
        "--out-dir {params.out_dir:q} {params.stream} --threads {threads} --no-progress 3>&1 > {log:q} 2>&1"


rule null_diffs:
    """Each null pair diffed and labelled as a step of the grid is: the null's label counts."""
    input:
        saes=null_sae_outputs("{layer}"),
        calibration=lambda w: (
            [] if THRESHOLDS_FROM_RESAMPLING else [grid.calibration_json(w.layer, n) for n in DIFF_SAES]
        ),
        acts=manifests("M0_D0"),
        samples=grid.samples("D0"),
    output:
        [grid.null_json("{layer}", name) for name in DIFF_SAES],
        null_cosines("{layer}"),
    log:
        "logs/null_diffs/layer{layer}.log",
    benchmark:
        bench("null_diffs", "layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 4
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, diff=config["diff"]),
        split_seed=config["diff"]["resampling"]["seed"],
        acts_dir=lambda w: grid.activations_dir("M0_D0"),
        pairs=config["diff"]["resampling"]["pairs"],
        null_dir=lambda w: grid.null_dir(w.layer),  # holds the null SAEs listed as input
        calibration=lambda w: (
            "" if THRESHOLDS_FROM_RESAMPLING else f"--calibration {shlex.quote(grid.calibration_dir(w.layer))}"
        ),
        out_dir=lambda w: grid.null_dir(w.layer),
    shell:
        "sae-diff null-diffs --spec {params.spec:q} --layer {wildcards.layer} --null-dir {params.null_dir:q} "
        "--pairs {params.pairs} {params.calibration} --acts-dir {params.acts_dir:q} "
        "--samples {input.samples:q} --split-seed {params.split_seed} "
        "--out-dir {params.out_dir:q} --threads {threads} > {log:q} 2>&1"


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
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
    params:
        spec=lambda w: spec(saes={n: config["saes"][n] for n in DIFF_SAES}, diff=config["diff"]),
        a_saes=grid.saes_dir("{a}", "{layer}"),
        b_saes=grid.saes_dir("{b}", "{layer}"),
        cells=pair_args,
        calibration=grid.calibration_dir("{layer}"),
        out_dir=grid.diff_dir("{a}", "{b}", "{layer}"),
    shell:
        "sae-diff diff --spec {params.spec:q} --a {wildcards.a} --b {wildcards.b} --layer {wildcards.layer} "
        "--a-saes {params.a_saes:q} --b-saes {params.b_saes:q} {params.cells} "
        "--calibration {params.calibration:q} --out-dir {params.out_dir:q} --threads {threads} > {log:q} 2>&1"


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
        spec=lambda w: spec(
            saes={n: config["saes"][n] for n in DIFF_SAES},
            grid=config["grid"],
            data=config["data"],
            diff=config["diff"],
        ),
        out_dir=grid.evolution_dir("{layer}"),
    shell:
        "sae-diff evolution --spec {params.spec:q} --layer {wildcards.layer} --diffs {input.diffs:q} "
        "--calibration {input.calibration:q} --saes {input.saes:q} --stats {input.stats:q} "
        "--nulls {input.nulls:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
