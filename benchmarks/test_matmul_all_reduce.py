"""Row-parallel GEMM + all-reduce on the Llama-3-70B o_proj / down_proj shapes.

Runs `distfuse-bench --op matmul_all_reduce` through the launcher, writes
benchmarks/results/matmul_all_reduce_<gpu>_w<W>.{json,md,png} and checks every
distfuse output against torch.matmul + NCCL within the dtype's tolerance, and the
all-reduce-alone columns for exact sums. Speed is read from the tables.
"""
import pytest

from distfuse.bench.__main__ import launch
from distfuse.bench.results import load, validate

pytestmark = pytest.mark.multigpu


def test_matmul_all_reduce_sweep(bench_argv, op_report):
    report = launch(["--op", "matmul_all_reduce"] + bench_argv)
    entry = op_report(report, "matmul_all_reduce")
    doc = load(entry["files"]["json"])
    validate(doc)
    tol = doc["tolerance"]
    for row in doc["rows"]:
        s = row["shape"]
        where = f"{s['name']} M={s['M']} {s['b_layout']} graph={row['graph']}"
        assert row["times_us"]["distfuse"] is not None, \
            f"{where}: distfuse did not run: {row.get('errors', {}).get('distfuse')}"
        assert row["rel_err"].get("distfuse") is not None, f"{where}: no correctness result"
        for method, err in row["rel_err"].items():
            assert err is None or err <= tol, f"{where}: {method} rel_err {err} > {tol}"
        assert row["wrong_ar"] == 0, f"{where}: all-reduce alone gave wrong sums"
    assert not entry["failures"], entry["failures"]
