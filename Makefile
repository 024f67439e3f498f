VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo full seeds quick audit test test-fast test-latest lock lint

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup_env.sh scripts/check_env.py
	bash scripts/setup_env.sh $(VENV)

setup: $(VENV)/.installed

# The main job on the embedded default model: the end-to-end experiment and its report.
demo: setup
	$(PY) -m trialign experiment --config configs/experiment/demo.yaml

# Every method (8 trained, 3 training-free) at the demo's sizes.
full: setup
	$(PY) -m trialign experiment --config configs/experiment/full.yaml $(if $(wildcard runs/experiment/demo/experiment.json),--reuse-from runs/experiment/demo)

# TriAlign, DPO and the no-penalty ablation with training seeds 0, 1 and 2, pooled (the demo's main split).
seeds: setup
	$(PY) -m trialign experiment --config configs/experiment/seeds.yaml $(if $(wildcard runs/experiment/demo/experiment.json),--reuse-from runs/experiment/demo)

# The same pipeline in a few minutes (a smoke test, not a result).
quick: setup
	$(PY) -m trialign experiment --config configs/experiment/quick.yaml

# The truth-consistency audit of the embedded model (100 TruthfulQA MC1 items x 9 groups).
audit: setup
	$(PY) -m trialign evaluate --config configs/audit/truthfulqa_mc1.yaml

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The newest release of every dependency (unpinned) in a separate venv, then the fast suite: moving the pins forward
# is this, then `make lock VENV=.venv-latest` when it is green.
test-latest:
	bash scripts/setup_env.sh .venv-latest --latest
	.venv-latest/bin/python -m pytest -q -m "not slow and not pinned"

# Write constraints.txt from VENV's installed versions (keeps the header).
lock:
	{ grep '^#' constraints.txt; $(PY) scripts/check_env.py --freeze; } > constraints.txt.new && mv constraints.txt.new constraints.txt
