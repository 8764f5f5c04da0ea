# Same-token model diffing: each iteration Mi against the base model M0 on the same texts of Di
# (cells M0Di and MiDi), per layer at the resid_post site: a diff-SAE on Mi - M0, the
# activation-difference lens, per-token KL, and one record per pair and layer that the summary reads.

SAME_TOKEN_PAIR = grid.same_token_pair("{i}")


rule crosscoder:
    input:
        unpack(same_token_inputs),
    output:
        grid.crosscoder_files(SAME_TOKEN_PAIR, "{layer}"),
    log:
        "logs/crosscoder/M{i}_layer{layer}.log",
    benchmark:
        bench("crosscoder", "M{i}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=crosscoder_spec,
        out_dir=grid.diffing_dir("crosscoder", SAME_TOKEN_PAIR, "{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff crosscoder --spec {params.spec:q} --layer {wildcards.layer} "
        "--acts {input.base_acts:q} {input.tuned_acts:q} --model-dirs {input.base_model:q} {input.tuned_model:q} "
        "--names M0 M{wildcards.i} --samples {input.samples:q} --out-dir {params.out_dir:q} "
        "--threads {threads} 3>&1 > {log:q} 2>&1"


rule crosscoder_all_iterations:
    """One crosscoder over M0..MX on the same tokens of the last iteration's data."""
    input:
        acts=lambda w: [grid.manifest(c.name, grid.site_dir(int(w.layer), "resid_post")) for c in ALL_ITERATIONS],
        models=[grid.model_dir(c.model) for c in ALL_ITERATIONS],
        samples=grid.samples(ALL_ITERATIONS[-1].data) if ALL_ITERATIONS else [],
    output:
        grid.crosscoder_files(grid.all_iterations_name(config), "{layer}"),
    log:
        "logs/crosscoder/all_layer{layer}.log",
    benchmark:
        bench("crosscoder", "all_layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=12000,
    params:
        spec=crosscoder_spec,
        names=" ".join(c.model for c in ALL_ITERATIONS),
        out_dir=grid.diffing_dir("crosscoder", grid.all_iterations_name(config), "{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff crosscoder --spec {params.spec:q} --layer {wildcards.layer} "
        "--acts {input.acts:q} --model-dirs {input.models:q} --names {params.names} --samples {input.samples:q} "
        "--out-dir {params.out_dir:q} --threads {threads} 3>&1 > {log:q} 2>&1"


rule diff_sae:
    input:
        unpack(same_token_inputs),
    output:
        latents=grid.diff_sae_latents(SAME_TOKEN_PAIR, "{layer}"),
        metrics=grid.diff_sae_metrics(SAME_TOKEN_PAIR, "{layer}"),
    log:
        "logs/diff_sae/M{i}_layer{layer}.log",
    benchmark:
        bench("diff_sae", "M{i}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            diff_sae=config["diffing"]["diff_sae"],
            training=diffing_training(),
            features=config["features"],
            **placement(),
        ),
        out_dir=grid.diffing_dir("diff_sae", SAME_TOKEN_PAIR, "{layer}"),
    shell:
        "SAE_DIFF_PROGRESS_FD=3 sae-diff diff-sae --spec {params.spec:q} --layer {wildcards.layer} "
        "--base-acts {input.base_acts:q} --tuned-acts {input.tuned_acts:q} --base-model-dir {input.base_model:q} "
        "--tuned-model-dir {input.tuned_model:q} --samples {input.samples:q} --out-dir {params.out_dir:q} "
        "--threads {threads} 3>&1 > {log:q} 2>&1"


rule metric_latents:
    """The diff-SAE latents behind each probed metric: chosen on the data's train split, reported on its
    eval split against a permutation null and beside as many random directions chosen the same way.
    With causal tests on the data's own prompts, only their feature-selection part is read (the split)."""
    input:
        unpack(same_token_inputs),
        **({"split": grid.prompt_split()} if INTERVENTION_RUNS else {}),
        diff_sae=grid.diff_sae_metrics(SAME_TOKEN_PAIR, "{layer}"),
    output:
        grid.diff_sae_metric_latents(SAME_TOKEN_PAIR, "{layer}"),
    log:
        "logs/metric_latents/M{i}_layer{layer}.log",
    benchmark:
        bench("metric_latents", "M{i}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
    resources:
        mem_mb=8000,
    params:
        spec=lambda w: spec(
            metric_latents=config["diffing"]["metric_latents"],
            metrics=grid.probe_metric_filters(config),
            pooling=config["probes"]["pooling"],
            **placement(),
        ),
        folder=lambda w, input: os.path.dirname(input.diff_sae),
        split=prompt_split_arg,
    shell:
        "sae-diff metric-latents --spec {params.spec:q} --base-acts {input.base_acts:q} "
        "--tuned-acts {input.tuned_acts:q} --base-model-dir {input.base_model:q} --tuned-model-dir {input.tuned_model:q} "
        "--samples {input.samples:q} --diff-sae {params.folder:q} {params.split} --out {output:q} "
        "--threads {threads} > {log:q} 2>&1"


rule adl:
    """The activation-difference lens of iteration i at every diffing layer (one pass per model)."""
    input:
        base_model=grid.model_dir("M0"),
        tuned_model=grid.model_dir("M{i}"),
        samples=grid.samples("D{i}"),
        prompts=config["diffing"]["adl"]["prompts"],
    output:
        [path for layer in DIFFING_LAYERS for path in grid.adl_files(SAME_TOKEN_PAIR, layer)],
    log:
        "logs/adl/M{i}.log",
    benchmark:
        bench("adl", "M{i}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
    params:
        spec=lambda w: spec(adl=config["diffing"]["adl"], **placement()),
        layers=" ".join(map(str, DIFFING_LAYERS)),
        out_dirs=lambda w: " ".join(
            shlex.quote(grid.diffing_dir("adl", grid.same_token_pair(w.i), layer)) for layer in DIFFING_LAYERS
        ),
    shell:
        "sae-diff adl --spec {params.spec:q} --base-model-dir {input.base_model:q} "
        "--tuned-model-dir {input.tuned_model:q} --samples {input.samples:q} --prompts {input.prompts:q} "
        "--layers {params.layers} --out-dirs {params.out_dirs} --threads {threads} > {log:q} 2>&1"


rule token_kl:
    """Per-token KL(Mi || M0) and KL(M0 || Mi) on the eval split of Di."""
    input:
        base_model=grid.model_dir("M0"),
        tuned_model=grid.model_dir("M{i}"),
        samples=grid.samples("D{i}"),
    output:
        grid.kl_files(SAME_TOKEN_PAIR),
    log:
        "logs/token_kl/M{i}.log",
    benchmark:
        bench("token_kl", "M{i}")
    conda:
        "../envs/torch.yaml"
    # one core: on two it keeps ~1 busy (Python, I/O), so two such jobs run side by side
    threads: 1
    params:
        spec=lambda w: spec(kl=config["diffing"]["kl"], max_length=config["activations"]["max_length"], **placement()),
        out_dir=grid.diffing_dir("kl", SAME_TOKEN_PAIR),
    shell:
        "sae-diff token-kl --spec {params.spec:q} --base-model-dir {input.base_model:q} "
        "--tuned-model-dir {input.tuned_model:q} --samples {input.samples:q} --out-dir {params.out_dir:q} "
        "--threads {threads} > {log:q} 2>&1"


rule kl_recovery:
    """The share of KL(Mi || M0) each method's top directions close when added into M0 at the layer,
    beside as many random latents of the same dictionary."""
    input:
        unpack(kl_recovery_inputs),
    output:
        grid.kl_recovery(SAME_TOKEN_PAIR, "{layer}"),
    log:
        "logs/kl_recovery/M{i}_layer{layer}.log",
    benchmark:
        bench("kl_recovery", "M{i}_layer{layer}")
    conda:
        "../envs/torch.yaml"
    threads: 4
    params:
        spec=lambda w: spec(
            kl=config["diffing"]["kl"],
            top=config["diffing"]["top"],
            max_length=config["activations"]["max_length"],
            seed=config["seed"],
            **placement(),
        ),
        methods=lambda w, input: method_folder_args(input, ("crosscoder", "diff_sae", "adl")),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    shell:
        "sae-diff kl-recovery --spec {params.spec:q} --layer {wildcards.layer} --base-model-dir {input.base_model:q} "
        "--tuned-model-dir {input.tuned_model:q} --samples {input.samples:q} {params.methods} "
        "--out-dir {params.out_dir:q} --threads {threads} > {log:q} 2>&1"


# every diff-SAE latent's best crosscoder match, beside the record, when both methods ran
RECORD_MATCHES = (
    {"matches": grid.diffing_matches(SAME_TOKEN_PAIR, "{layer}")}
    if {"crosscoder", "diff_sae"} <= set(DIFFING_METHODS)
    else {}
)


rule diffing_record:
    """Each method's top findings for one pair and layer, and where two methods find the same direction;
    with the crosscoder and the diff-SAE, every diff-SAE latent's best crosscoder match (parquet)."""
    input:
        unpack(diffing_record_inputs),
    output:
        **RECORD_MATCHES,
        record=grid.diffing_record(SAME_TOKEN_PAIR, "{layer}"),
    log:
        "logs/diffing_record/M{i}_layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(top=config["diffing"]["top"], agreement_cosine=config["diffing"]["agreement_cosine"]),
        methods=lambda w, input: method_folder_args(input, ("crosscoder", "diff_sae", "adl", "kl"))
        + (f" --kl-recovery {shlex.quote(input.kl_recovery)}" if "kl_recovery" in input.keys() else "")
        + (f" --metric-latents {shlex.quote(input.metric_latents)}" if "metric_latents" in input.keys() else ""),
        matches=lambda w, output: (f"--matches {shlex.quote(output.matches)}" if "matches" in output.keys() else ""),
    shell:
        "sae-diff diffing-record --spec {params.spec:q} --pair M0_D{wildcards.i}__M{wildcards.i}_D{wildcards.i} "
        "--layer {wildcards.layer} {params.methods} {params.matches} --out {output.record:q} > {log:q} 2>&1"


rule diffing_record_all_iterations:
    """The all-iterations crosscoder's findings: per iteration, the latents its decoder holds and M0's does not."""
    input:
        crosscoder=grid.crosscoder_files(grid.all_iterations_name(config), "{layer}")[1:],
    output:
        grid.diffing_record(grid.all_iterations_name(config), "{layer}"),
    log:
        "logs/diffing_record/all_layer{layer}.log",
    conda:
        "../envs/analysis.yaml"
    params:
        spec=lambda w: spec(top=config["diffing"]["top"], agreement_cosine=config["diffing"]["agreement_cosine"]),
        pair=grid.all_iterations_name(config),
        folder=lambda w, input: os.path.dirname(input.crosscoder[0]),
    shell:
        "sae-diff diffing-record --spec {params.spec:q} --pair {params.pair} --layer {wildcards.layer} "
        "--crosscoder {params.folder:q} --out {output:q} > {log:q} 2>&1"
