"""All-reduce sweep (NCCL, torch symm_mem one/two-shot, distfuse paths; eager and graph).

Runs `distfuse-bench --op all_reduce` through the launcher, writes
benchmarks/results/all_reduce_<gpu>_w<W>.{json,md,png} and checks that every
method produced the exact sum (#wrong == 0). Speed is read from the tables.
"""
import pytest

from distfuse.bench.__main__ import launch
from distfuse.bench.results import load, validate

pytestmark = pytest.mark.multigpu


def test_all_reduce_sweep(bench_argv, op_report):
    report = launch(["--op", "all_reduce"] + bench_argv)
    entry = op_report(report, "all_reduce")
    doc = load(entry["files"]["json"])
    validate(doc)
    assert doc["world_size"] >= 2
    for row in doc["rows"]:
        where = f"{row['shape']['bytes']} B, graph={row['graph']}"
        assert row["wrong_total"] == 0, f"{where}: wrong elements per method {row['wrong']}"
        for method in ("nccl", "distfuse"):
            assert row["times_us"][method] is not None, \
                f"{where}: {method} did not run: {row.get('errors', {}).get(method)}"
    assert not entry["failures"], entry["failures"]
