# Two commands do all the set-up on a fresh clone:
#   make demo   -> creates .venv, installs medldm, runs the main job on shipped sample scans
#   make test   -> creates .venv, installs medldm[test], runs the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel keeps installs small where no GPU is wanted; users with a GPU install torch first.
TORCH_SPEC ?= torch==2.13.0

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	# the Fréchet Radiomics Distance of `medldm audit` (extra `radiomics`): pyradiomics has no wheel for Python >= 3.10
	# and its sdist does not declare its build requirements, so they go first (docs/audit.md, "Radiomics")
	$(BIN)/pip install -q numpy versioneer SimpleITK pywavelets pykwalify
	$(BIN)/pip install -q --no-build-isolation "pyradiomics>=3.0" "frd-score>=1.0"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medldm demo -o demo_out

test: install
	$(BIN)/python -m pytest -q -n 2 -rs --durations=15

lint: install
	$(BIN)/ruff check medldm tests tools

# Every CUDA path in one command (GPU machines only, never CI): one JSON line per part + a summary; exit 2 without CUDA.
gpu-check: install
	$(BIN)/python tools/gpu_check.py
.PHONY: gpu-check

.PHONY: install demo test lint
