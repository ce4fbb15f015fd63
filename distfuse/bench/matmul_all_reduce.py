"""Row-parallel GEMM + all-reduce: Llama-3-70B o_proj and down_proj at tensor-parallel W.

Rank r computes a_r [M, K] @ b_r [K, N] with K = hidden/W (o_proj) or
intermediate/W (down_proj), N = hidden, and the partial products are summed over
the ranks. ``b`` is ``w.t()`` for a weight w [N, K] as stored by ``nn.Linear``
(and, for o_proj, also a row-major [K, N] copy).

Columns, all measured in the same run (µs per call):
  matmul                    torch.matmul alone
  ar_<backend>, ar_symm_one_shot, ar_symm_two_shot, ar_distfuse
                            all-reduce alone of an [M, N] tensor; ar_best is their minimum
  matmul+<backend>          torch.matmul, then dist.all_reduce
  matmul+distfuse_ar        torch.matmul, then distfuse.all_reduce
  distfuse                  distfuse.matmul_all_reduce, dispatcher's choice (``path``)
  distfuse:<path>           the same, forced onto one path (GPU runs)
  ideal                     max(matmul, ar_best): full overlap
Derived: hidden share = (T(matmul+<backend>) - T(distfuse)) / T(ar_<backend>), the
part of the stand-alone all-reduce the fused op hides; speedup = min(T(matmul+<backend>),
T(matmul+distfuse_ar)) / T(distfuse). Correctness: each distfuse output against
matmul+<backend> on the same inputs (relative Frobenius error, max over ranks).
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import all_reduce as ar
from .results import OpResult, Table, Unavailable, dtype_name, fmt, fmt_err, forced_cell, with_timing_details
from .timing import BenchContext, Method, Timing, geomean, slots_for_bytes, tuned_method_name

OP = "matmul_all_reduce"
HIDDEN, INTERMEDIATE = 8192, 28672          # Llama-3-70B
CPU_HIDDEN, CPU_INTERMEDIATE = 512, 1792    # same ratio, small enough for a CPU run
FULL_M = [1, 8, 32, 128, 512, 2048, 4096, 8192, 16384]
QUICK_M = [1, 128, 2048]
CPU_M = [1, 8, 32]
CPU_QUICK_M = [1, 32]
GRAPH_MAX_M = 512                           # --graph auto: graph rows for M <= this, eager above
SHAPES = ("o_proj", "down_proj")
ROW_MAJOR_SHAPE = "o_proj"                  # also measured with a row-major b
FORCED_PATHS = ("sequential", "fused_tiles", "decode_push", "decode_split_k", "chunked", "copy_engine", "band_pull", "pair_exchange",
                "owner_exchange", "band_scatter")
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}


# Timed unless --paths says otherwise: every schedule but the split-K decode schedule,
# which dispatch never picks (slower than the unfused order at every measured row; NOTES.md, v46).
DEFAULT_FORCED_PATHS = tuple(p for p in FORCED_PATHS if p != "decode_split_k")


def forced_paths(ctx, default=DEFAULT_FORCED_PATHS):
    """The forced-path columns of this run (--paths, else `default`); the pair exchange
    only at W = 2, the one group size it exists for."""
    given = ctx.options.get("paths")
    paths = tuple(p for p in FORCED_PATHS if p in given) if given else tuple(default)
    return tuple(p for p in paths if p != "pair_exchange" or ctx.world == 2)


def shape_dims(ctx: BenchContext, name: str) -> Tuple[int, int]:
    """(K_total, N) of a layer, before sharding."""
    hidden, inter = (CPU_HIDDEN, CPU_INTERMEDIATE) if ctx.cpu else (HIDDEN, INTERMEDIATE)
    return {"o_proj": (hidden, hidden), "down_proj": (inter, hidden)}[name]


def m_list(ctx: BenchContext) -> List[int]:
    given = ctx.options.get("m")
    if given:
        return list(given)
    if ctx.cpu:
        return CPU_QUICK_M if ctx.quick else CPU_M
    return QUICK_M if ctx.quick else FULL_M


# Where an output holds NaN or Inf (a call that left it unwritten, say): an error far
# above every tolerance, and a number that strict JSON can hold.
NON_FINITE_ERR = 1e30
_ERR_TILE = 128


def rel_err(out: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> Optional[float]:
    """||out - ref|| / ||ref|| over the whole output and over each of its 128 x 128 tiles
    (as [rows, N]), the largest: one wrong tile of a large output cannot hide in the norm
    of the rest. NON_FINITE_ERR where either holds NaN or Inf; None without both."""
    if out is None or ref is None:
        return None
    r = ref.float().reshape(-1, ref.shape[-1]) if ref.dim() else ref.float().reshape(1, 1)
    o = out.float().reshape(r.shape)
    if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
        return NON_FINITE_ERR
    d = o - r
    pad = (0, (-r.shape[1]) % _ERR_TILE, 0, (-r.shape[0]) % _ERR_TILE)

    def tile_norms(x):
        x = torch.nn.functional.pad(x, pad)
        return x.reshape(x.shape[0] // _ERR_TILE, _ERR_TILE, x.shape[1] // _ERR_TILE, _ERR_TILE) \
            .pow(2).sum((1, 3)).sqrt()

    num, den = tile_norms(d), tile_norms(r)
    tiles = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), num)
    whole = torch.linalg.vector_norm(d) / torch.linalg.vector_norm(r).clamp_min(torch.finfo(torch.float32).tiny)
    return max(float(tiles.max()), float(whole))


def output_errors(ctx: BenchContext, timings: Dict[str, Timing], ref_name: str,
                  names: List[str]) -> Dict[str, Optional[float]]:
    """Per method in `names`: rel_err of every slot of its correctness run against the same
    slot of `ref_name`'s (both ran on the same inputs), the largest over slots and ranks.
    None where the method did not run; NON_FINITE_ERR where it ran but the reference left
    nothing to compare with."""
    ref = timings[ref_name].outputs
    local = []
    for nm in names:
        outs = timings[nm].outputs
        if not outs:
            local.append(-1.0)
        elif len(ref) < len(outs):
            local.append(NON_FINITE_ERR)
        else:
            local.append(max(rel_err(o, r) for o, r in zip(outs, ref)))
    merged = ctx.timer.max_over_ranks(local)
    return {nm: (e if e >= 0 else None) for nm, e in zip(names, merged)}


def run(ctx: BenchContext) -> OpResult:
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    ms = m_list(ctx)
    names = [s for s in (ctx.options.get("shapes") or SHAPES)]
    notes: List[str] = []
    cases = []  # (name, K_total, K, N, layout)
    for name in names:
        k_total, n = shape_dims(ctx, name)
        if k_total % ctx.world:
            notes.append(f"{name}: K = {k_total} is not divisible by W = {ctx.world}; skipped")
            continue
        cases.append((name, k_total, k_total // ctx.world, n, "weight_t"))
        if name == ROW_MAJOR_SHAPE:
            cases.append((name, k_total, k_total // ctx.world, n, "row_major"))

    if not cases:
        raise Unavailable("; ".join(notes) or "no shapes selected")
    max_out = max([m * n * esize for m in ms for (_, _, _, n, _) in cases] or [0])
    p2p = ar.ensure_workspace(ctx, max_out)
    ctx.log(f"  [matmul_all_reduce] distfuse.init_workspace(max_bytes={max_out}) -> p2p={p2p}")

    # Symmetric buffers for the all-reduce-alone columns.
    pool = None
    if not ctx.cpu and cases:
        pool = ar.symm_pool(ctx)
        n_out = max(c[3] for c in cases)
        plan = []
        for m in ms:
            for graph in ctx.graph_variants(m <= GRAPH_MAX_M):
                plan.append((m * n_out * esize, slots_for_bytes(4 * m * n_out * esize, graph, ctx.timer.config)))
        caps = [max([b for b, sl in plan if sl > i] or [0]) for i in range(max(sl for _, sl in plan))]
        pool.ensure(caps)

    rows: List[Dict[str, Any]] = []
    failures: List[str] = []
    errors_seen: Dict[str, str] = {}
    ar_cache: Dict[Tuple[int, int, bool], Dict[str, Any]] = {}
    tol = TOLERANCE.get(ctx.dtype, 2e-2)

    for (name, k_total, k, n, layout) in cases:
        for m in ms:
            for graph in ctx.graph_variants(m <= GRAPH_MAX_M):
                key = (m, n, graph)
                if key not in ar_cache:
                    ar_cache[key] = _all_reduce_alone(ctx, m, n, graph, pool)
                row = _case(ctx, name, k_total, k, n, layout, m, graph, ar_cache[key], errors_seen)
                rows.append(row)
                ctx.log(_progress(row))
                bad = [f"{meth} rel_err {e:.3g} > {tol}" for meth, e in row["rel_err"].items()
                       if e is not None and not (e <= tol)]
                if bad:
                    failures.append(f"{name} M={m} {layout} graph={graph}: " + "; ".join(bad))
                if row["wrong_ar"]:
                    failures.append(f"{name} M={m} graph={graph}: all-reduce alone gave "
                                    f"{row['wrong_ar']} wrong elements")

    table = _table(ctx, rows, errors_seen, notes, tol)
    return OpResult(OP, rows, table,
                    extra={"dtype": dtype_name(ctx.dtype), "tolerance": tol, "p2p": bool(p2p)},
                    summary=_summary(ctx, rows), failures=failures, plot=plot)


def _all_reduce_alone(ctx: BenchContext, m: int, n: int, graph: bool, pool) -> Dict[str, Any]:
    """All-reduce columns for an [M, N] output (shared by every shape with that M and N)."""
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    slots = slots_for_bytes(4 * m * n * esize, graph, ctx.timer.config)
    tag = m * n + 17
    srcs = [ctx.rand_int([m, n], ar._seed(ctx, ctx.rank, tag, s), ar.BOUND) for s in range(slots)]
    methods = ar.all_reduce_methods(ctx, srcs, pool, prefix="ar_", forced_paths=())
    timings = ctx.timer.run_all(methods, graph=graph)
    expected = [ar.expected_sum(ctx, [m, n], tag, s) for s in range(slots)]
    wrong_local = [ar.count_wrong_slots(t, expected.__getitem__) for t in timings.values()]
    wrong = int(sum(ctx.timer.sum_over_ranks(wrong_local)))
    return {"timings": {k: v for k, v in timings.items()}, "wrong": wrong}


def _case(ctx: BenchContext, name, k_total, k, n, layout, m, graph, ar_alone, errors_seen) -> Dict[str, Any]:
    import distfuse

    esize = torch.empty((), dtype=ctx.dtype).element_size()
    set_bytes = (m * k + k * n + 2 * m * n) * esize
    slots = slots_for_bytes(set_bytes, graph, ctx.timer.config)
    seed = ctx.seed * 31 + zlib.crc32(f"{name}/{layout}/{m}".encode()) % 100_000
    a_s, b_s = [], []
    for s in range(slots):
        base = seed + 1000 * s + 97 * ctx.rank
        a_s.append(ctx.randn([m, k], base + 1))
        w = ctx.randn([n, k], base + 2, scale=1.0 / math.sqrt(k_total))   # nn.Linear layout [out, in]
        b_s.append(w.t() if layout == "weight_t" else w.t().contiguous())
        del w
    gname, group, backend = ctx.group_name, ctx.group, ctx.backend

    def mm(slot):
        return torch.matmul(a_s[slot], b_s[slot])

    def mm_c10d(slot):
        y = torch.matmul(a_s[slot], b_s[slot])
        dist.all_reduce(y, group=group)
        return y

    def mm_df_ar(slot):
        return distfuse.all_reduce(torch.matmul(a_s[slot], b_s[slot]), gname)

    def fused(slot):
        return distfuse.matmul_all_reduce(a_s[slot], b_s[slot], gname)

    def path_info():
        return {"path": ar.last_path(OP, ctx)}

    methods = [
        Method("matmul", mm, slots=slots),
        Method(f"matmul+{backend}", mm_c10d, slots=slots),
        Method("matmul+distfuse_ar", mm_df_ar, slots=slots),
        Method("distfuse", fused, slots=slots, info=path_info),
    ]
    if not ctx.cpu:
        for p in forced_paths(ctx):
            def forced(slot, p=p):
                with distfuse.force_path(OP, p):
                    return distfuse.matmul_all_reduce(a_s[slot], b_s[slot], gname)
            methods.append(Method(f"distfuse:{p}", forced, slots=slots, info=path_info))
        tune_path = ctx.tune_path("fused_tiles")
        for overrides in ctx.tune_variants(OP):
            def tuned(slot, overrides=overrides):
                with distfuse.force_path(OP, tune_path), distfuse.tuning(overrides):
                    return distfuse.matmul_all_reduce(a_s[slot], b_s[slot], gname)
            methods.append(Method(tuned_method_name(tune_path, overrides), tuned, slots=slots, info=path_info))
    timings: Dict[str, Timing] = ctx.timer.run_all(methods, graph=graph)
    a_s.clear()  # frees the inputs (the closures above hold the lists)
    b_s.clear()

    # Correctness against matmul + c10d all_reduce, slot by slot on the same inputs.
    checked = [nm for nm in timings if nm.startswith("distfuse") or nm == "matmul+distfuse_ar"]
    errs = output_errors(ctx, timings, f"matmul+{backend}", checked)

    times: Dict[str, Optional[float]] = {}
    times["matmul"] = timings["matmul"].us
    for nm, t in ar_alone["timings"].items():
        times[nm] = t.us
    ar_names = [nm for nm in ar_alone["timings"]]
    ar_vals = [(times[nm], nm) for nm in ar_names if times[nm] is not None]
    best = min(ar_vals) if ar_vals else (None, None)
    times["ar_best"] = best[0]
    for nm in timings:
        if nm != "matmul":
            times[nm] = timings[nm].us
    mmt = times["matmul"]
    times["ideal"] = max(mmt, best[0]) if (mmt is not None and best[0] is not None) else None

    t_seq_c10d = times.get(f"matmul+{backend}")
    t_seq_df = times.get("matmul+distfuse_ar")
    t_fused = times.get("distfuse")
    t_ar_c10d = times.get(f"ar_{backend}")
    hidden = ((t_seq_c10d - t_fused) / t_ar_c10d
              if None not in (t_seq_c10d, t_fused, t_ar_c10d) and t_ar_c10d > 0 else None)
    seq_best = min([t for t in (t_seq_c10d, t_seq_df) if t is not None], default=None)
    speedup = seq_best / t_fused if (seq_best is not None and t_fused) else None

    all_t = dict(timings)
    all_t.update(ar_alone["timings"])
    row = {
        "shape": {"name": name, "M": m, "K": k, "N": n, "K_total": k_total, "b_layout": layout},
        "dtype": dtype_name(ctx.dtype),
        "graph": bool(graph),
        "times_us": times,
        "path": timings["distfuse"].info.get("path"),
        "paths": {nm: t.info.get("path") for nm, t in timings.items() if t.info.get("path")},
        "ar_best_method": best[1],
        "hidden_share": hidden,
        "speedup": speedup,
        "rel_err": errs,
        "rel_err_max": max([e for e in errs.values() if e is not None], default=None),
        "wrong_ar": ar_alone["wrong"],
        "tflops_matmul": (2.0 * m * k * n / (mmt * 1e-6) / 1e12) if mmt else None,
    }
    return with_timing_details(row, all_t, errors_seen)


def _progress(row) -> str:
    s, t = row["shape"], row["times_us"]
    return (f"  [matmul_all_reduce] {s['name']} M={s['M']} {s['b_layout']} {'graph' if row['graph'] else 'eager'}: "
            f"mm {fmt(t['matmul'])}, ar_best {fmt(t['ar_best'])}, distfuse {fmt(t.get('distfuse'))} "
            f"({row['path']}), speedup {fmt(row['speedup'], 2)}, rel_err {fmt(row['rel_err_max'], 5)}")


def _table(ctx, rows, errors_seen, notes, tol) -> Table:
    b = ctx.backend
    # (method name, the schedule it forces) of each forced column
    forced = [(f"distfuse:{p}", p) for p in forced_paths(ctx)] if not ctx.cpu else []
    tune_path = ctx.tune_path("fused_tiles")
    forced += [(tuned_method_name(tune_path, o), tune_path) for o in ctx.tune_variants(OP)]
    heads = ["shape", "M", "K", "N", "b", "mode", "mm us", "AR best us", "AR best", f"mm+{b} us",
             "mm+df AR us"] + [f"df:{f.split(':', 1)[1]} us" for f, _ in forced] + \
            ["distfuse us", "path", "ideal us", "hidden", "speedup", "rel_err"]
    table = Table(heads)
    for r in rows:
        s, t = r["shape"], r["times_us"]
        cells = [s["name"], str(s["M"]), str(s["K"]), str(s["N"]), "w.t()" if s["b_layout"] == "weight_t" else "row",
                 "graph" if r["graph"] else "eager", fmt(t["matmul"]), fmt(t["ar_best"]),
                 str(r["ar_best_method"] or "n/a").replace("ar_", ""), fmt(t.get(f"matmul+{b}")),
                 fmt(t.get("matmul+distfuse_ar"))]
        cells += [forced_cell(fmt(t.get(f)), path, r["paths"].get(f)) for f, path in forced]
        cells += [fmt(t.get("distfuse")), str(r["path"] or "n/a"), fmt(t.get("ideal")),
                  (f"{100 * r['hidden_share']:.0f}%" if r["hidden_share"] is not None else "n/a"),
                  (f"{r['speedup']:.2f}x" if r["speedup"] is not None else "n/a"),
                  fmt_err(r["rel_err_max"])]
        table.rows.append(cells)
    table.notes.append("µs per call, max over ranks of each rank's median. AR best: fastest all-reduce alone of "
                       f"the [M, N] output among {b}, torch symm_mem one/two-shot and distfuse. ideal = max(mm, AR "
                       f"best). hidden = (T(mm+{b}) - T(distfuse)) / T({b} all-reduce alone). speedup = "
                       f"min(T(mm+{b}), T(mm+df AR)) / T(distfuse). rel_err: max over distfuse outputs vs "
                       f"mm+{b} (tolerance {tol:g}).")
    table.notes += notes
    for n, e in errors_seen.items():
        table.notes.append(f"{n}: n/a ({e})")
    return table


def _summary(ctx, rows) -> str:
    if not rows:
        return "matmul_all_reduce: no rows"
    errs = [r["rel_err_max"] for r in rows if r["rel_err_max"] is not None]
    parts = []
    for name in dict.fromkeys((r["shape"]["name"], r["shape"]["b_layout"]) for r in rows):
        sub = [r for r in rows if (r["shape"]["name"], r["shape"]["b_layout"]) == name]
        ms = [r["shape"]["M"] for r in sub]
        keep = {ms[0], ms[-1]} | ({128, 2048} & set(ms))  # a few M values: the line stays short
        sp = " ".join(f"{r['shape']['M']}:{fmt(r['speedup'], 2)}" for r in sub if r["shape"]["M"] in keep)
        label = name[0] + ("" if name[1] == "weight_t" else "(row)")
        parts.append(f"{label} {sp}")
    g = geomean([r["speedup"] for r in rows])
    worst = f"{max(errs):.1e}" if errs else "n/a"
    return (f"matmul_all_reduce rel_err<={worst}; speedup vs best unfused, geo-mean {fmt(g, 2)}x; "
            + "; ".join(parts))


def plot(plt, rows, title):
    groups = list(dict.fromkeys((r["shape"]["name"], r["shape"]["b_layout"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
    backend = next((k.split("+", 1)[1] for k in rows[0]["times_us"] if k.startswith("matmul+")
                    and k != "matmul+distfuse_ar"), "nccl")
    series = ["matmul", "ar_best", f"matmul+{backend}", "matmul+distfuse_ar", "distfuse", "ideal"]
    for ax, grp in zip(axes[0], groups):
        sub = sorted([r for r in rows if (r["shape"]["name"], r["shape"]["b_layout"]) == grp],
                     key=lambda r: r["shape"]["M"])
        for sname in series:
            pts = [(r["shape"]["M"], r["times_us"].get(sname)) for r in sub if r["times_us"].get(sname)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle=":" if sname == "ideal" else "-", label=sname)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("µs per call")
        ax.set_title(f"{grp[0]} ({'w.t()' if grp[1] == 'weight_t' else 'row-major b'})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return fig
