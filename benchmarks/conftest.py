"""Markers and skips for the benchmark suite (the same rules as tests/conftest.py).

The benchmarks run the `distfuse-bench` sweeps through the same code as the CLI,
write the results files and assert correctness (not speed). Knobs:
DISTFUSE_BENCH_FULL=1 (full sweeps instead of --quick), DISTFUSE_BENCH_OUTPUT
(results directory, default benchmarks/results), DISTFUSE_BENCH_ARGS (extra
CLI arguments, e.g. "--world-size 2").
"""
import os
import shlex

import pytest
import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs (skipped where there are none)")
    config.addinivalue_line("markers", "multigpu: needs at least 2 CUDA GPUs with P2P")


def pytest_collection_modifyitems(config, items):
    n = gpu_count()
    skip_gpu = pytest.mark.skip(reason="GPU benchmark: no CUDA GPU on this machine")
    skip_multi = pytest.mark.skip(reason=f"multi-GPU benchmark: needs >= 2 CUDA GPUs, found {n}")
    for item in items:
        if "gpu" in item.keywords and n == 0:
            item.add_marker(skip_gpu)
        elif "multigpu" in item.keywords and n < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def bench_argv():
    """Common CLI arguments: output directory, --quick unless DISTFUSE_BENCH_FULL=1, extra args."""
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"})
    argv = ["--output-dir", os.environ.get("DISTFUSE_BENCH_OUTPUT", RESULTS_DIR)]
    if os.environ.get("DISTFUSE_BENCH_FULL", "0") != "1":
        argv.append("--quick")
    argv += shlex.split(os.environ.get("DISTFUSE_BENCH_ARGS", ""))
    return argv


def _single_op_report(report, op):
    """The report entry of ``op``, after checking that the run itself went through."""
    assert "error" not in report, f"a benchmark rank failed: {report.get('error')}"
    entries = [e for e in report["ops"] if e["op"] == op]
    assert entries, f"no report for {op}: {report}"
    entry = entries[0]
    assert "error" not in entry and "skipped" not in entry, entry
    return entry


@pytest.fixture
def op_report():
    """op_report(report, op) -> the launcher report's entry for ``op`` (asserts it ran)."""
    return _single_op_report
