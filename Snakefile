# sae-diff: what changed inside a language model across fine-tuning iterations, and
# whether it matters causally, using sparse autoencoders.
#
#   snakemake --cores 8 results/summary.json                       # the demo (config/config.yaml)
#   snakemake --cores 8 --configfile config/test.yaml              # tiny random model
#   snakemake --profile profiles/slurm results/summary.json        # on a SLURM cluster

from snakemake.utils import min_version

min_version("8.20")


# the demo config unless the user names one: merging both would mix their models
if not config:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/saes.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/diffs.smk"
include: "workflow/rules/diffing.smk"
include: "workflow/rules/probes.smk"
include: "workflow/rules/interventions.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/dashboard.smk"
include: "workflow/rules/summary.smk"


rule all:
    default_target: True
    input:
        grid.summary_json(),
        [grid.dashboard_index()] if config["dashboard"]["enabled"] else [],
