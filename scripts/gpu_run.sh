#!/usr/bin/env bash
# One command for a lent GPU machine: GPU tests, then the benchmarks, results to $OUT.
#
#   scripts/gpu_run.sh                      # tests + distfuse-bench (matmul_all_reduce, all GPUs)
#   scripts/gpu_run.sh --op all --quick     # options go to `python3 -m distfuse.bench`
#
# The repository copy is used in place (PYTHONPATH), with the prebuilt
# distfuse/_C.abi3.so carried from the development machine. Without it the
# library is built here, which needs the CUTLASS headers (nvidia-cutlass).
#
# Environment knobs: PYTHON (default python3), DISTFUSE_SKIP_TESTS=1,
# DISTFUSE_WORLD_SIZES (e.g. "2 4": a benchmark run per world size; default all GPUs),
# DISTFUSE_PROBE=1 (the NVLink probe first; DISTFUSE_PROBE_BIN: a prebuilt binary),
# DISTFUSE_TEST_TIMEOUT / DISTFUSE_BENCH_TIMEOUT (seconds; 900 / 1500),
# DISTFUSE_TEST_WORLD_SIZES (e.g. "4": the multi-GPU tests at those W only; with
# CUDA_VISIBLE_DEVICES two GPU pairs can run the W = 2 tests at once),
# DISTFUSE_TEST_RANKS_PER_GPU (e.g. 2: W = 8 on 4 GPUs, ranks sharing GPUs over gloo;
# correctness of the W-rank paths only, see tests/dist_harness.py),
# DISTFUSE_TEST_ARGS (extra pytest arguments), DISTFUSE_RESULTS_DIR.
#
# Writes to $OUT (or /tmp/distfuse-gpu-run): tests.log, bench.log, results.tgz
# (the results directory), the markdown tables of this run and summary.txt;
# at most 8 files, none in sub-folders. Exit code: 0 when the tests and the
# benchmarks (including their correctness checks) passed, 1 otherwise, 2 when
# the library is unusable.
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}

# NVLink multicast stays off in every process (DESIGN.md, machines).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

LOGDIR=${OUT:-/tmp/distfuse-gpu-run}
mkdir -p "$LOGDIR"
TEST_TIMEOUT=${DISTFUSE_TEST_TIMEOUT:-900}
BENCH_TIMEOUT=${DISTFUSE_BENCH_TIMEOUT:-1500}
RESULTS_DIR=${DISTFUSE_RESULTS_DIR:-$REPO/benchmarks/results}
mkdir -p "$RESULTS_DIR"
STAMP=$(mktemp)   # results written after this are this run's

echo "== machine"
timeout 30 nvidia-smi -L || echo "nvidia-smi failed"
timeout 120 "$PY" - <<'EOF' || echo "torch check failed"
import sys, torch
nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, "
      f"GPUs {torch.cuda.device_count()}")
EOF

echo "== library"
if ! ls distfuse/_C*.so >/dev/null 2>&1; then
    echo "no prebuilt distfuse/_C*.so in the repository copy: building it here"
    if ! timeout 60 "$PY" -c "import cutlass_library" >/dev/null 2>&1; then
        echo "ERROR: cannot build distfuse here: the CUTLASS headers (pip package nvidia-cutlass==4.2.0.0)"
        echo "       are not installed and this machine has no network. Build on the development machine"
        echo "       and carry the library: run(..., carry=['distfuse/_C.abi3.so'])."
        exit 2
    fi
    if ! timeout 3000 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOGDIR/build.log" 2>&1; then
        echo "ERROR: building distfuse failed (last lines of build.log):"
        tail -n 30 "$LOGDIR/build.log"
        exit 2
    fi
fi
if ! timeout 120 "$PY" -c "import distfuse; print('distfuse', distfuse.__version__, 'build', distfuse.build_id(), 'built_with_cuda =', distfuse.built_with_cuda(), 'from', distfuse._LIBRARY_PATH)"; then
    echo "ERROR: distfuse does not import (see above)"
    exit 2
fi

TEST_RC=0
TEST_LINE="tests skipped (DISTFUSE_SKIP_TESTS=1)"
if [ "${DISTFUSE_SKIP_TESTS:-0}" != "1" ]; then
    echo "== tests: pytest -m 'gpu or multigpu' tests (timeout ${TEST_TIMEOUT}s)"
    PER_TEST=""
    # A hanging test fails alone (pytest-timeout, where installed) instead of stopping the step.
    if timeout 60 "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
        PER_TEST="--timeout=${DISTFUSE_TEST_CASE_TIMEOUT:-300}"
    fi
    # shellcheck disable=SC2086
    timeout -k 30 "$TEST_TIMEOUT" "$PY" -m pytest -m "gpu or multigpu" tests -q -p no:cacheprovider \
        $PER_TEST ${DISTFUSE_TEST_ARGS:-} 2>&1 | tee "$LOGDIR/tests.log"
    TEST_RC=$?
    TEST_LINE=$(grep -E "([0-9]+ (passed|failed|error|errors|skipped|deselected))|no tests ran" "$LOGDIR/tests.log" | tail -n 1)
    case $TEST_RC in
        0) ;;
        5) TEST_LINE="no GPU tests collected ($TEST_LINE)"; TEST_RC=0 ;;
        124|137)
            # Killed before pytest's own summary: count the progress characters printed so far.
            PROGRESS=$(grep -E '^[.FEsxX]+( +\[ *[0-9]+%\])?$' "$LOGDIR/tests.log" | sed 's/ .*//' | tr -d '\n')
            TEST_LINE="TIMED OUT after ${TEST_TIMEOUT}s; so far $(printf %s "$PROGRESS" | tr -cd . | wc -c) passed, $(printf %s "$PROGRESS" | tr -cd FE | wc -c) failed, $(printf %s "$PROGRESS" | tr -cd s | wc -c) skipped" ;;
    esac
    [ -n "$TEST_LINE" ] || TEST_LINE="pytest exited with $TEST_RC"
fi

# DISTFUSE_PROBE=1: the NVLink probe first (benchmarks/micro/nvlink_probe.cu; a
# prebuilt binary at $DISTFUSE_PROBE_BIN, else built here with nvcc).
if [ "${DISTFUSE_PROBE:-0}" = "1" ]; then
    PROBE=${DISTFUSE_PROBE_BIN:-/tmp/nvlink_probe}
    if [ ! -x "$PROBE" ] && command -v nvcc >/dev/null 2>&1; then
        nvcc -O3 -arch=sm_90a -o "$PROBE" benchmarks/micro/nvlink_probe.cu || echo "nvlink_probe: build failed"
    fi
    if [ -x "$PROBE" ]; then
        echo "== NVLink probe"
        timeout 300 "$PROBE" 2>&1 | tee "$LOGDIR/probe.log" | tail -n 5
    else
        echo "nvlink_probe: no binary and no nvcc here"
    fi
fi

# DISTFUSE_WORLD_SIZES="2 4": one benchmark run per world size (same machine, so the
# results of every W compare); default: one run on every visible GPU.
BENCH_RC=0
: > "$LOGDIR/bench.log"
for W in ${DISTFUSE_WORLD_SIZES:-all}; do
    WORLD_ARGS=()
    [ "$W" = "all" ] || WORLD_ARGS=(--world-size "$W")
    echo "== benchmarks: python3 -m distfuse.bench ${WORLD_ARGS[*]} $* (timeout ${BENCH_TIMEOUT}s)"
    timeout -k 30 "$BENCH_TIMEOUT" "$PY" -m distfuse.bench --output-dir "$RESULTS_DIR" "${WORLD_ARGS[@]}" "$@" \
        2>&1 | tee -a "$LOGDIR/bench.log"
    rc=${PIPESTATUS[0]}
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "benchmarks (W=$W) TIMED OUT after ${BENCH_TIMEOUT}s"
    [ $rc -eq 0 ] || BENCH_RC=$rc
done

if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" -C "$(dirname "$RESULTS_DIR")" "$(basename "$RESULTS_DIR")" 2>/dev/null \
        || echo "could not archive $RESULTS_DIR"
    # At most 8 files come back: logs, results.tgz, summary.txt, then this run's tables.
    n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    for md in $(find "$RESULTS_DIR" -maxdepth 1 -name '*.md' -newer "$STAMP" | sort); do
        [ "$n" -lt 7 ] || break
        cp "$md" "$OUT/" && n=$((n + 1))
    done
fi
rm -f "$STAMP"

STATUS=0
[ $TEST_RC -eq 0 ] || STATUS=1
[ $BENCH_RC -eq 0 ] || STATUS=1
{
    echo "==== gpu_run summary ===="
    echo "device: $(timeout 30 nvidia-smi -L 2>/dev/null | wc -l) x $(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "tests (rc $TEST_RC): $TEST_LINE"
    echo "benchmarks (rc $BENCH_RC):"
    grep -E "^(SUMMARY|BARS|SKIPPED|ERROR|RESULT|  FAIL)" "$LOGDIR/bench.log" | cut -c1-400 || echo "  no summary (see bench.log)"
    echo "results: $RESULTS_DIR${OUT:+ (archived in \$OUT/results.tgz)}"
    echo "exit: $STATUS"
} | tee "$LOGDIR/summary.txt"
exit $STATUS
