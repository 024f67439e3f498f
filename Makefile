VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo quick audit test test-fast

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

setup: $(VENV)/.installed

# The main job on the embedded default model: the end-to-end experiment and its report.
demo: setup
	$(PY) -m trialign experiment --config configs/experiment/demo.yaml

# The same pipeline in a few minutes (a smoke test, not a result).
quick: setup
	$(PY) -m trialign experiment --config configs/experiment/quick.yaml

# The truth-consistency audit of the embedded model (100 TruthfulQA MC1 items x 9 groups).
audit: setup
	$(PY) -m trialign evaluate --config configs/audit/truthfulqa_mc1.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"
