VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup audit test test-fast bench clean-cache

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

setup: $(VENV)/.installed

# The main job on the embedded default model.
audit: setup
	$(PY) -m trialign evaluate --config configs/audit/truthfulqa_mc1.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"
