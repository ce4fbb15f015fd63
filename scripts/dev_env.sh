#!/usr/bin/env bash
# Sets up a fresh machine for distfuse: a virtual environment with the pinned
# packages from PyPI, then builds and installs distfuse into it (editable).
#   scripts/dev_env.sh            # creates ./.venv (or $DISTFUSE_VENV)
# CUDA kernels are compiled when nvcc is found (torch from PyPI is a CUDA 13
# build); DISTFUSE_CPU_ONLY=1 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTFUSE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.11.0" "nvidia-cutlass==4.2.0.0" numpy pytest \
  expecttest ninja "setuptools>=64" wheel matplotlib "transformers==5.23.0" "accelerate==1.15.0"

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"
export MAX_JOBS=${MAX_JOBS:-2}
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import distfuse; print('distfuse', distfuse.__version__, 'built with CUDA kernels:', distfuse.built_with_cuda())"
