"""distfuse-bench in its CPU mode (2 processes over gloo, reference path): it finishes,
prints the labelled tables and writes results files that follow the schema."""
import json
import os
import re
import subprocess
import sys

import pytest

import distfuse
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


def load_checked(path, op, world=2):
    with open(path) as f:
        doc = json.load(f)  # strict JSON: NaN would not parse back as a number here
    validate(doc)
    assert doc["op"] == op
    assert doc["gpu"] == "cpu" and doc["world_size"] == world and doc["cpu_reference"] is True
    assert doc["torch"] and doc["date"]
    assert doc["build"] == distfuse.build_id()
    return doc


def test_build_id_names_a_commit_of_this_repository():
    build = distfuse.build_id()
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?|unknown", build), build
    git = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True)
    if build == "unknown" or git.returncode != 0:
        pytest.skip(f"build id {build!r}, or no git checkout here")
    commit = build.split("+")[0]
    found = subprocess.run(["git", "cat-file", "-e", commit + "^{commit}"], cwd=ROOT, capture_output=True)
    assert found.returncode == 0, f"the library's build id {build} is no commit of this repository"


@pytest.mark.parametrize("op", ["matmul_all_reduce", "all_reduce"])
def test_cpu_bench(tmp_path, op):
    out = run_bench(tmp_path, "--op", op)
    assert CPU_LABEL in out
    assert f"## {op}" in out and "RESULT ok" in out
    stem = tmp_path / f"{op}_cpu_w2"
    doc = load_checked(stem.with_suffix(".json"), op)
    md = stem.with_suffix(".md").read_text()
    assert CPU_LABEL in md and "world size 2" in md and "torch" in md and "NCCL" in md
    assert f"distfuse build: {doc['build']}" in md
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


def test_cpu_decoder_layer_forced_paths(tmp_path):
    """--paths with the decoder layer: a column per schedule forced onto every
    matmul_all_reduce call of the layer, next to the dispatcher's column."""
    out = run_bench(tmp_path, "--op", "decoder_layer", "--paths", "sequential", "pair_exchange")
    assert "RESULT ok" in out, out[-3000:]
    doc = load_checked(tmp_path / "decoder_layer_cpu_w2.json", "decoder_layer")
    md = (tmp_path / "decoder_layer_cpu_w2.md").read_text()
    assert "df:sequential us" in md and "df:pair_exchange us" in md
    assert doc["rows"]
    for row in doc["rows"]:
        for key in ("distfuse", "reference", "distfuse:sequential", "distfuse:pair_exchange"):
            assert row["times_us"][key] is not None and row["times_us"][key] > 0, key
        assert set(row["forced_ran"]) == {"sequential", "pair_exchange"}


def test_cpu_decoder_layer_compiled(tmp_path):
    """--compiled: the F.linear + all_reduce layer compiled by Inductor, without and with
    the distfuse.compile pass, timed beside the eager columns and checked against them."""
    out = run_bench(tmp_path, "--op", "decoder_layer", "--compiled")
    assert "RESULT ok" in out and "compiled, gain of the pass" in out, out[-3000:]
    doc = load_checked(tmp_path / "decoder_layer_cpu_w2.json", "decoder_layer")
    md = (tmp_path / "decoder_layer_cpu_w2.md").read_text()
    assert "compiled us" in md and "compiled+pass us" in md and "compile gain" in md
    assert doc["rows"]
    for row in doc["rows"]:
        for key in ("compiled", "compiled+pass"):
            assert row["times_us"][key] is not None and row["times_us"][key] > 0, key
            assert 0.0 <= row["compiled_rel_err"][key] <= doc["tolerance"], key
        assert row["compile_gain_pct"] is not None


def test_cpu_hf_llama(tmp_path):
    """--op hf_llama: a transformers Llama sharded by transformers' tp_plan and by
    distfuse.integrations.transformers, timed side by side, their outputs compared."""
    out = run_bench(tmp_path, "--op", "hf_llama")
    assert "RESULT ok" in out and "hf_llama gain over transformers' TP" in out, out[-3000:]
    doc = load_checked(tmp_path / "hf_llama_cpu_w2.json", "hf_llama")
    assert doc["rows"]
    for row in doc["rows"]:
        for key in ("distfuse", "transformers_tp"):
            assert row["times_us"][key] is not None and row["times_us"][key] > 0, key
        assert row["rel_err"] is not None and 0.0 <= row["rel_err"] <= doc["tolerance"]


def test_cpu_bench_at_world_size_8(tmp_path):
    """The TP=8 setting: every benchmark runs its W = 8 code paths over gloo with 8
    processes (shapes, shards, decoder heads), exact all-reduces, results files valid."""
    out = run_bench(tmp_path, "--op", "all", "--world-size", "8")
    assert "RESULT ok" in out and "SKIPPED" not in out, out[-3000:]
    for op in ("all_reduce", "matmul_all_reduce", "decoder_layer"):
        doc = load_checked(tmp_path / f"{op}_cpu_w8.json", op, world=8)
        assert doc["rows"], op
        if op == "all_reduce":
            assert all(row["wrong_total"] == 0 for row in doc["rows"])
        if op == "matmul_all_reduce":
            assert all(row["shape"]["K"] * 8 == row["shape"]["K_total"] for row in doc["rows"])


def _ar_row(nbytes, graph, distfuse, peers, busbw=None, wrong=0):
    nccl, one, two = peers
    return {"shape": {"bytes": nbytes, "count": nbytes // 2}, "graph": graph, "wrong_total": wrong,
            "times_us": {"nccl": nccl, "symm_one_shot": one, "symm_two_shot": two, "distfuse": distfuse},
            "busbw_GBs": {"distfuse": busbw}}


def test_bars_all_reduce_verdicts():
    from distfuse.bench import bars
    doc = {"op": "all_reduce", "world_size": 4, "cpu_reference": False, "rows": [
        _ar_row(4 << 10, True, 5.0, (9.0, 5.0, 6.0)),                       # ties the best peer: met
        _ar_row(1 << 20, True, 13.5, (20.0, 19.0, 13.4)),                   # 1.007x: missed
        _ar_row(16 << 20, False, 100.0, (120.0, None, 96.0)),               # 1.04x: met (<= 1.05)
        _ar_row(256 << 20, False, 800.0, (900.0, None, 820.0), busbw=329.9, wrong=1),
    ]}
    verdict = {(b.row, b.bar): b.met for b in bars.evaluate(doc)}
    assert verdict[("4 KB graph", "distfuse / best peer")]
    assert not verdict[("1 MB graph", "distfuse / best peer")]
    assert verdict[("16 MB eager", "distfuse / best peer")]
    assert verdict[("256 MB eager", "distfuse / best peer")]
    assert not verdict[("256 MB eager", "busbw distfuse (GB/s)")]
    assert not verdict[("256 MB eager", "#wrong")]
    line = bars.summary_line(doc)
    assert line.startswith("BARS all_reduce W=4: 6/9 met") and "1 MB graph" in line
    assert bars.evaluate(dict(doc, cpu_reference=True)) is None


def test_bars_matmul_all_reduce_verdicts():
    from distfuse.bench import bars
    times = {"matmul": 10.0, "ideal": 10.0, "matmul+nccl": 30.0, "matmul+distfuse_ar": 20.0}
    decode = {"shape": {"name": "o_proj", "M": 1, "b_layout": "weight_t"}, "graph": True, "path": "sequential",
              "times_us": dict(times, distfuse=15.0), "hidden_share": 0.5}
    prefill = {"shape": {"name": "o_proj", "M": 8192, "b_layout": "row_major"}, "graph": False,
               "path": "fused_tiles", "hidden_share": 0.40,
               "times_us": {"matmul": 400.0, "ideal": 600.0, "matmul+nccl": 1000.0, "matmul+distfuse_ar": 950.0,
                            "distfuse": 650.0}}
    doc = {"op": "matmul_all_reduce", "world_size": 2, "rows": [decode, prefill]}
    verdict = {(b.row.split(" (")[0], b.bar): b.met for b in bars.evaluate(doc)}
    assert verdict[("o_proj M=1 w.t()", "fused (us) <= 1.2 x matmul + 3")]      # 15 <= 15
    assert verdict[("o_proj M=1 w.t()", "fused / best unfused")]                 # 15 < 20
    assert verdict[("o_proj M=8192 row", "fused / ideal")]                       # 1.083 <= 1.10
    assert not verdict[("o_proj M=8192 row", "hidden share")]                    # 0.40 < 0.443
    decode["times_us"]["distfuse"] = 21.0
    verdict = {(b.row.split(" (")[0], b.bar): b.met for b in bars.evaluate(doc)}
    assert not verdict[("o_proj M=1 w.t()", "fused (us) <= 1.2 x matmul + 3")]
    assert not verdict[("o_proj M=1 w.t()", "fused / best unfused")]


def test_bars_name_outputs_off_the_reference():
    """The bars output names a row whose outputs the file records as off the reference."""
    from distfuse.bench import bars
    row = {"shape": {"name": "o_proj", "M": 8, "b_layout": "weight_t"}, "graph": True, "path": "sequential",
           "times_us": {"matmul": 10.0, "ideal": 10.0, "matmul+nccl": 30.0, "distfuse": 15.0},
           "rel_err": {"distfuse": 3e-3, "distfuse:band_pull": 0.5}, "wrong_ar": 0}
    doc = {"op": "matmul_all_reduce", "world_size": 2, "tolerance": 2e-2, "rows": [row]}
    assert bars.output_problems(doc) == ["o_proj M=8 weight_t graph: distfuse:band_pull rel_err 0.5 > 0.02"]
    assert "OUTPUT PROBLEMS" in bars.summary_line(doc) and "1 problem(s)" in bars.markdown(doc)
    row["rel_err"]["distfuse:band_pull"] = 1e-3
    row["wrong_ar"] = 3
    assert bars.output_problems(doc) == ["o_proj M=8 weight_t graph: 3 wrong elements (wrong_ar)"]
    row["wrong_ar"] = 0
    assert bars.output_problems(doc) == [] and "OUTPUT" not in bars.summary_line(doc)


def test_rel_err_sees_one_wrong_tile_and_nan():
    """One zeroed 128 x 128 tile of a large output, a NaN, or a missing rank's share of a
    small output: each far above the bf16 tolerance, where rounding stays far below it."""
    import torch

    from distfuse.bench.matmul_all_reduce import NON_FINITE_ERR, TOLERANCE, rel_err
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8192, 8192, generator=g)
    rounded = ref.to(torch.bfloat16)
    assert rel_err(rounded, ref) < TOLERANCE[torch.bfloat16] / 4
    one_tile = rounded.clone()
    one_tile[4096:4224, 128:256] = 0
    assert torch.linalg.vector_norm(one_tile.float() - ref) / torch.linalg.vector_norm(ref) < 0.02  # the norm alone misses it
    assert rel_err(one_tile, ref) > 0.9
    nan = rounded.clone()
    nan[7, 7] = float("nan")
    assert rel_err(nan, ref) == NON_FINITE_ERR
    parts = torch.randn(2, 3, 1000, generator=g)
    assert rel_err(parts[0], parts.sum(0)) > 0.5
    assert rel_err(None, ref) is None


def test_bars_of_committed_results_are_recomputable():
    """Every committed GPU results file has a bars section equal to the one its JSON gives."""
    from distfuse.bench import bars
    results = os.path.join(ROOT, "benchmarks", "results")
    checked = 0
    for name in sorted(os.listdir(results)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results, name)) as f:
            doc = json.load(f)
        text = bars.markdown(doc)
        if not text:
            continue
        with open(os.path.join(results, name[:-5] + ".md")) as f:
            assert text in f.read(), f"{name}: the .md has no (or a stale) bars section"
        checked += 1
    assert checked > 0


def test_forced_columns_name_the_schedule_that_ran():
    """A forced schedule that falls back shows the one that ran; the pair exchange is a
    column at W = 2 only."""
    import types

    from distfuse.bench.matmul_all_reduce import forced_paths
    from distfuse.bench.results import forced_cell
    assert forced_cell("2773.7", "band_scatter", "band_pull") == "2773.7 (band_pull)"
    assert forced_cell("2773.7", "band_pull", "band_pull") == "2773.7"
    assert forced_cell("n/a", "band_pull", None) == "n/a"
    given = {"paths": ["band_pull", "pair_exchange"]}
    assert forced_paths(types.SimpleNamespace(options=given, world=2)) == ("band_pull", "pair_exchange")
    assert forced_paths(types.SimpleNamespace(options=given, world=4)) == ("band_pull",)
    assert "pair_exchange" not in forced_paths(types.SimpleNamespace(options={}, world=8))


def test_tune_sweep_variants_and_errors():
    """--tune KEY=V1,V2: one column per combination of the op's keys (matmul_all_reduce also
    takes the keys of the all-reduce it runs); bad keys or values fail early."""
    import types

    from distfuse.bench.timing import BenchContext, tuned_method_name
    opts = {"tune": {"matmul_all_reduce.consumer_blocks": [16, 32], "matmul_all_reduce.group_tiles": [1, 4],
                     "all_reduce.two_shot_blocks": [64]}}
    ctx = types.SimpleNamespace(options=opts, cpu=False)
    variants = BenchContext.tune_variants(ctx, "matmul_all_reduce")
    assert len(variants) == 4
    assert {"matmul_all_reduce.consumer_blocks": 32, "matmul_all_reduce.group_tiles": 4,
            "all_reduce.two_shot_blocks": 64} in variants
    assert BenchContext.tune_variants(ctx, "all_reduce") == [{"all_reduce.two_shot_blocks": 64}]
    assert BenchContext.tune_variants(ctx, "decoder_layer") == []
    assert BenchContext.tune_variants(types.SimpleNamespace(options=opts, cpu=True), "all_reduce") == []
    assert tuned_method_name("fused_tiles", variants[0]) == \
        "distfuse:fused_tiles[two_shot_blocks=64,consumer_blocks=16,group_tiles=1]"
    for bad, words in (("bogus=1", "key must be one of"), ("all_reduce.two_shot_blocks=0", ">= 1"),
                       ("all_reduce.two_shot_blocks=x", "integers")):
        proc = subprocess.run([sys.executable, "-m", "distfuse.bench", "--cpu", "--tune", bad], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--tune" in proc.stderr and words in proc.stderr, proc.stderr[-500:]


def test_timeline_lists_the_last_call_by_start_and_sums_each_stream():
    from distfuse.bench.timeline import timeline_lines
    events = [{"ts": 0.0, "dur": 100.0, "tid": 7, "name": "tile_gemm_kernel (call 1)"},
              {"ts": 150.0, "dur": 10.0, "tid": 9, "name": "band_pull_kernel (call 1)"},
              {"ts": 1100.0, "dur": 5.0, "tid": 9, "name": "Memcpy PtoP"},
              {"ts": 1000.0, "dur": 400.0, "tid": 7, "name": "tile_gemm_kernel (call 2)"},
              {"ts": 1010.0, "dur": 50.0, "tid": 9, "name": "band_pull_kernel (call 2)"}]
    lines = timeline_lines(events, "t")
    assert lines[0] == "== t: 3 device events, 400.0 us"
    assert [line.split()[0] for line in lines[2:5]] == ["0.0", "10.0", "100.0"]
    assert "band_pull_kernel (call 2)" in lines[3]
    assert lines[-1] == "busy per stream (us): 7: 400.0, 9: 55.0"


def test_timeline_without_gpus_says_so():
    import torch
    if torch.cuda.is_available():
        pytest.skip("GPUs present")
    env = dict(os.environ, **SAFE_ENV)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "distfuse.bench.timeline", "--path", "band_pull"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs CUDA GPUs" in proc.stderr, proc.stdout + proc.stderr


def _order_of_calls(interleave):
    """The calls Timer.run_all makes to two methods (one process, gloo)."""
    import torch
    import torch.distributed as dist
    from distfuse.bench.timing import Method, Timer, TimingConfig

    calls = []

    def method(name):
        def fn(slot):
            calls.append(name)
            return torch.ones(2)
        # Like the paths the ops record: what the last call of any method did.
        return Method(name, fn, info=lambda: {"last_call": calls[-1]})

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cfg = TimingConfig(iters=8, warmup=1, min_iters=1, max_seconds=60.0, interleave=interleave)
        timings = Timer(dist.group.WORLD, cfg, torch.device("cpu")).run_all([method("a"), method("b")])
    finally:
        dist.destroy_process_group()
    assert [t.samples for t in timings.values()] == [8, 8]
    assert all(t.us is not None and t.us > 0 and t.output is not None for t in timings.values())
    # Each method's info describes its own call, though the other method ran after it.
    assert {name: t.info for name, t in timings.items()} == {"a": {"last_call": "a"}, "b": {"last_call": "b"}}
    return calls


def test_timer_takes_the_samples_round_the_methods():
    # set-up calls, warm-ups, 8 rounds of samples (each method once per round, in an
    # order that changes between rounds), correctness runs
    calls = _order_of_calls(interleave=True)
    assert calls[:4] == ["a", "b", "a", "b"] and calls[-2:] == ["a", "b"]
    rounds = [tuple(calls[4 + 2 * i:6 + 2 * i]) for i in range(8)]
    assert all(sorted(r) == ["a", "b"] for r in rounds), rounds
    assert set(rounds) == {("a", "b"), ("b", "a")}, rounds
    assert _order_of_calls(interleave=False) == ["a"] * 11 + ["b"] * 11


def test_sample_order_is_a_shuffle_fixed_by_the_round():
    from distfuse.bench.timing import sample_order
    items = list(range(14))
    orders = [sample_order(items, i) for i in range(50)]
    assert all(sorted(o) == items for o in orders)
    assert orders == [sample_order(items, i) for i in range(50)]  # the same on every rank
    # No column always follows the same one.
    for j in items:
        before = {o[o.index(j) - 1] for o in orders if o.index(j) > 0}
        assert len(before) > 3, (j, before)
