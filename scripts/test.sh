#!/usr/bin/env bash
# The test command: set-up (scripts/dev_env.sh), then the C++ unit tests (CMake +
# CTest) and the Python tests. GPU tests are skipped where there is no GPU and
# are listed as skipped. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTFUSE_VENV:-.venv}
bash scripts/dev_env.sh

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
echo "== C++ unit tests"
TORCH_CMAKE=$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_CMAKE"
cmake --build build/cpp -j "${MAX_JOBS:-2}"
ctest --test-dir build/cpp --output-on-failure

echo "== Python tests"
set +e
"$VENV/bin/python" -m pytest tests -rs "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
