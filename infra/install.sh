#!/usr/bin/env bash
# Installs the project into ./.venv (or the active virtualenv): torch first, matched to the machine, then the package.
#   bash infra/install.sh          # runtime
#   bash infra/install.sh --dev    # + test tools
# Torch: with an NVIDIA GPU (nvidia-smi lists one) the default PyPI wheel, which is the CUDA build; without one the
# CPU build (torch==2.13.0+cpu: from the local wheel store where pip is configured with one, else from
# $TORCH_CPU_INDEX, default PyTorch's CPU index). A bare `torch` requirement would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

have=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: GPU found -> torch==$TORCH_VERSION (CUDA build)"
  [[ "$have" == "$TORCH_VERSION" || "$have" == "$TORCH_VERSION+cu"* ]] || pip_install "torch==$TORCH_VERSION"
else
  echo "install: no GPU -> torch==$TORCH_VERSION+cpu"
  if [[ "$have" != "$TORCH_VERSION+cpu" ]]; then
    pip_install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || pip_install "torch==$TORCH_VERSION+cpu" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
pip_install -e ".$extra"
"$PY" -c 'import torch, ray, polars, mlflow; print(f"install: ok torch {torch.__version__}, ray {ray.__version__}, polars {polars.__version__}, mlflow {mlflow.__version__}")'
