#!/usr/bin/env bash
# The main job: set-up (scripts/dev_env.sh), then distfuse-bench on the GPUs present
# (one process per GPU), or a labelled CPU reference run where there is none.
# Arguments go to distfuse-bench (see `distfuse-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTFUSE_VENV:-.venv}
bash scripts/dev_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec "$VENV/bin/distfuse-bench" "$@"
