"""distfuse-bench in its CPU mode (2 processes over gloo, reference path): it finishes,
prints the labelled tables and writes results files that follow the schema."""
import json
import os
import subprocess
import sys

import pytest

from distfuse.bench.results import CPU_LABEL, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_bench(tmp_path, *args):
    env = dict(os.environ, **SAFE_ENV)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "distfuse.bench", "--cpu", "--quick", "--output-dir", str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def load_checked(path, op):
    with open(path) as f:
        doc = json.load(f)  # strict JSON: NaN would not parse back as a number here
    validate(doc)
    assert doc["op"] == op
    assert doc["gpu"] == "cpu" and doc["world_size"] == 2 and doc["cpu_reference"] is True
    assert doc["torch"] and doc["date"]
    return doc


@pytest.mark.parametrize("op", ["matmul_all_reduce", "all_reduce"])
def test_cpu_bench(tmp_path, op):
    out = run_bench(tmp_path, "--op", op)
    assert CPU_LABEL in out
    assert f"## {op}" in out and "RESULT ok" in out
    stem = tmp_path / f"{op}_cpu_w2"
    doc = load_checked(stem.with_suffix(".json"), op)
    md = stem.with_suffix(".md").read_text()
    assert CPU_LABEL in md and "world size 2" in md and "torch" in md and "NCCL" in md
    assert md.count("\n|") >= 3  # header, rule, at least one row
    for row in doc["rows"]:
        assert row["graph"] is False  # no graphs on CPU
        t = row["times_us"]
        assert t["distfuse"] is not None and t["distfuse"] > 0
        if op == "all_reduce":
            assert row["wrong_total"] == 0
            assert set(t) == {"gloo", "distfuse"}
            assert row["busbw_GBs"]["gloo"] > 0
            assert row["path"] == "reference"
        else:
            assert row["shape"]["name"] in ("o_proj", "down_proj")
            assert row["shape"]["K"] * 2 == row["shape"]["K_total"]
            for key in ("matmul", "ar_best", "matmul+gloo", "matmul+distfuse_ar", "ideal"):
                assert t[key] is not None and t[key] > 0, key
            assert 0.0 <= row["rel_err"]["distfuse"] <= doc["tolerance"]
            assert row["wrong_ar"] == 0
            assert row["speedup"] is not None and row["hidden_share"] is not None
    if op == "matmul_all_reduce":
        layouts = {(r["shape"]["name"], r["shape"]["b_layout"]) for r in doc["rows"]}
        assert ("o_proj", "row_major") in layouts and ("down_proj", "weight_t") in layouts
