"""All-reduce sweep: c10d (NCCL), torch symmetric-memory one/two-shot, distfuse.

Columns (µs per call, max over ranks of each rank's median): the process
group's backend (``dist.all_reduce``, in place), ``symm_one_shot`` and
``symm_two_shot`` (``torch.ops.symm_mem``, on symmetric buffers), ``distfuse``
(auto path) and each forced distfuse path. Inputs are random integers in
[-16, 16], so every method's output is compared exactly to the true sum (the
``#wrong`` column counts differing elements over all ranks and methods; it must
be 0). In-place methods get their inputs refilled before every sample and
before the correctness run, so each timed call reduces fresh data.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .results import OpResult, Table, dtype_name, fmt, fmt_bytes, forced_cell, with_timing_details
from .timing import BenchContext, Method, Timing, slots_for_bytes, tuned_method_name

OP = "all_reduce"
FULL_SIZES = [4 << 10 << (2 * i) for i in range(9)]     # 4 KB, 16 KB, ..., 256 MB (powers of 4)
QUICK_SIZES = [4 << 10, 1 << 20, 64 << 20]
CPU_SIZES = [4 << 10, 64 << 10, 1 << 20]
CPU_QUICK_SIZES = [4 << 10, 64 << 10]
GRAPH_MAX_BYTES = 4 << 20   # --graph auto: graph rows up to this size (eager rows for all sizes)
DISTFUSE_PATHS = ("reference", "one_shot", "two_shot", "two_shot_ll", "two_shot_ll128", "one_shot_ll128")
BOUND = 16                  # |input| <= 16: sums over <= 8 ranks are exact in bf16/fp16/fp32


def busbw_factor(world: int) -> float:
    return 2.0 * (world - 1) / world if world > 1 else 1.0


# ---- torch symmetric memory buffers ----

class SymmPool:
    """Symmetric buffers for the torch.ops.symm_mem columns, one per input slot.

    Each slot is one symmetric allocation (rendezvoused once); a call uses a view
    of its first bytes (same storage, offset 0). ``ensure`` grows the pool; it is
    collective, and every rank makes the same decisions.
    """

    def __init__(self, ctx: BenchContext):
        self.ctx = ctx
        self.buffers: List[torch.Tensor] = []
        self.error: Optional[str] = None
        if ctx.cpu:
            self.error = "CPU run (reference only)"

    def ensure(self, capacities: Sequence[int]) -> bool:
        if self.error is not None:
            return False
        need = len(capacities) > len(self.buffers) or any(
            self.buffers[i].numel() < c for i, c in enumerate(capacities) if i < len(self.buffers))
        if not need:
            return True
        caps = [max(c, self.buffers[i].numel() if i < len(self.buffers) else 0)
                for i, c in enumerate(capacities)]
        err = None
        try:
            import torch.distributed._symmetric_memory as symm_mem
            for name in ("one_shot_all_reduce", "two_shot_all_reduce_"):
                if not hasattr(torch.ops.symm_mem, name):
                    raise RuntimeError(f"torch.ops.symm_mem.{name} does not exist in torch {torch.__version__}")
            self.buffers = []
            torch.cuda.synchronize()
            for cap in caps:
                t = symm_mem.empty(int(cap), dtype=torch.uint8, device=self.ctx.device)
                symm_mem.rendezvous(t, self.ctx.group_name)
                self.buffers.append(t)
        except Exception as exc:  # noqa: BLE001
            err = f"symmetric memory unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if not self.ctx.timer.all_ok(err is None):
            self.error = err or "symmetric memory unavailable on another rank"
            self.buffers = []
            return False
        return True

    def view(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        return self.buffers[slot][:nbytes].view(like.dtype).view(like.shape)


def symm_pool(ctx: BenchContext) -> SymmPool:
    if ctx._symm is None:
        ctx._symm = SymmPool(ctx)
    return ctx._symm


# ---- the methods (shared with the matmul_all_reduce benchmark) ----

def _unavailable(name: str, reason: str) -> Method:
    def fn(slot):
        raise RuntimeError(reason)
    return Method(name, fn)


def all_reduce_methods(ctx: BenchContext, srcs: List[torch.Tensor], pool: Optional[SymmPool],
                       prefix: str = "", forced_paths: Sequence[str] = DISTFUSE_PATHS,
                       tune: Sequence[Dict[str, int]] = ()) -> List[Method]:
    """One method per all-reduce implementation, each reducing ``srcs[slot]`` (left intact).

    Names: ``<prefix><backend>``, ``<prefix>symm_one_shot``, ``<prefix>symm_two_shot``,
    ``<prefix>distfuse``, ``<prefix>distfuse:<path>`` for each forced path and
    ``<prefix>distfuse:<--tune-path>[...]`` for each set of dispatch-table overrides in
    ``tune``.
    """
    import distfuse
    group, gname = ctx.group, ctx.group_name
    slots = len(srcs)
    methods: List[Method] = []

    work = [torch.empty_like(s) for s in srcs]

    def refill(which):
        for s in which:
            work[s].copy_(srcs[s])

    def c10d_fn(slot):
        dist.all_reduce(work[slot], group=group)
        return work[slot]

    methods.append(Method(prefix + ctx.backend, c10d_fn, slots=slots, prepare=refill))

    if not ctx.cpu:
        if pool is not None and pool.error is None:
            views = [pool.view(s, srcs[s]) for s in range(slots)]

            def symm_refill(which):
                for s in which:
                    views[s].copy_(srcs[s])

            def one_shot(slot):
                return torch.ops.symm_mem.one_shot_all_reduce(views[slot], "sum", gname)

            def two_shot(slot):
                torch.ops.symm_mem.two_shot_all_reduce_(views[slot], "sum", gname)
                return views[slot]

            methods.append(Method(prefix + "symm_one_shot", one_shot, slots=slots, prepare=symm_refill))
            methods.append(Method(prefix + "symm_two_shot", two_shot, slots=slots, prepare=symm_refill))
        else:
            reason = pool.error if pool is not None else "no symmetric memory pool"
            methods.append(_unavailable(prefix + "symm_one_shot", reason))
            methods.append(_unavailable(prefix + "symm_two_shot", reason))

    def df(slot):
        return distfuse.all_reduce(srcs[slot], gname)

    methods.append(Method(prefix + "distfuse", df, slots=slots, info=lambda: {"path": last_path("all_reduce", ctx)}))
    if not ctx.cpu:
        for path in forced_paths:
            def forced(slot, path=path):
                with distfuse.force_path("all_reduce", path):
                    return distfuse.all_reduce(srcs[slot], gname)
            methods.append(Method(f"{prefix}distfuse:{path}", forced, slots=slots,
                                  info=lambda: {"path": last_path("all_reduce", ctx)}))
        tune_path = ctx.tune_path("auto")
        for overrides in tune:
            def tuned(slot, overrides=overrides):
                with distfuse.force_path("all_reduce", tune_path), distfuse.tuning(overrides):
                    return distfuse.all_reduce(srcs[slot], gname)
            methods.append(Method(prefix + tuned_method_name(tune_path, overrides), tuned, slots=slots,
                                  info=lambda: {"path": last_path("all_reduce", ctx)}))
    return methods


def last_path(op: str, ctx: BenchContext) -> str:
    """The path the last call of ``op`` took ("reference" where only the reference exists)."""
    import distfuse
    path = distfuse.last_path(op)
    if not path and (ctx.cpu or not distfuse.built_with_cuda()):
        return "reference"  # CPU kernels, and CUDA in a build without kernels, run the reference
    return path or "?"


def ensure_workspace(ctx: BenchContext, max_bytes: int) -> bool:
    """distfuse.init_workspace before any timing or graph capture, unless the group's
    workspace already holds ``max_bytes`` (every rank decides alike). Returns p2p."""
    import distfuse
    info = distfuse.workspace_info(ctx.group_name) if not ctx.cpu else {}
    if info and info.get("max_output_bytes", 0) >= max_bytes:
        return bool(info.get("p2p"))
    return bool(distfuse.init_workspace(ctx.group_name, max_bytes=max_bytes))


# ---- the sweep ----

def _seed(ctx: BenchContext, rank: int, size: int, slot: int) -> int:
    return ctx.seed * 1_000_003 + rank * 7919 + slot * 104_729 + size


def expected_sum(ctx: BenchContext, shape, size_tag: int, slot: int = 0) -> torch.Tensor:
    """The exact sum over ranks of the slot's inputs (regenerated from every rank's seed)."""
    acc = torch.zeros(shape, dtype=torch.float32, device=ctx.device)
    for r in range(ctx.world):
        acc += ctx.rand_int(shape, _seed(ctx, r, size_tag, slot), BOUND, dtype=torch.float32)
    return acc


def count_wrong(out: Optional[torch.Tensor], expected: torch.Tensor) -> int:
    if out is None:
        return 0
    return int((out.float().reshape(expected.shape) != expected).sum().item())


def count_wrong_slots(timing: Timing, expected_of_slot: Callable[[int], torch.Tensor]) -> int:
    """Elements of every slot's output of the correctness run (each call of a graph) that
    differ from that slot's exact sum."""
    return sum(count_wrong(out, expected_of_slot(j)) for j, out in enumerate(timing.outputs))


def sizes_for(ctx: BenchContext) -> List[int]:
    given = ctx.options.get("sizes")
    if given:
        return list(given)
    if ctx.cpu:
        return CPU_QUICK_SIZES if ctx.quick else CPU_SIZES
    return QUICK_SIZES if ctx.quick else FULL_SIZES


def run(ctx: BenchContext) -> OpResult:
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    sizes = [s for s in sizes_for(ctx) if s % esize == 0]
    plan = []  # (size, graph, slots)
    for size in sizes:
        for graph in ctx.graph_variants(size <= GRAPH_MAX_BYTES, both_when_small=True):
            # per slot: the source, an in-place copy, a symmetric buffer and an output
            plan.append((size, graph, slots_for_bytes(4 * size, graph, ctx.timer.config)))

    ensure_workspace(ctx, 0)  # created before any capture (the all-reduce needs no tile region)
    pool = None
    if not ctx.cpu:
        pool = symm_pool(ctx)
        n = max(sl for _, _, sl in plan)
        caps = [max([size for size, _, sl in plan if sl > i] or [0]) for i in range(n)]
        pool.ensure(caps)

    rows: List[Dict[str, Any]] = []
    failures: List[str] = []
    errors_seen: Dict[str, str] = {}
    factor = busbw_factor(ctx.world)
    for size in sizes:
        numel = size // esize
        max_slots = max(sl for s, _, sl in plan if s == size)
        srcs_all = [ctx.rand_int([numel], _seed(ctx, ctx.rank, size, s), BOUND) for s in range(max_slots)]
        expected = [expected_sum(ctx, [numel], size, s) for s in range(max_slots)]
        for s2, graph, slots in plan:
            if s2 != size:
                continue
            methods = all_reduce_methods(ctx, srcs_all[:slots], pool, tune=ctx.tune_variants(OP))
            timings = ctx.timer.run_all(methods, graph=graph)
            rows.append(_row(ctx, size, numel, graph, timings, expected.__getitem__, factor, errors_seen))
            ctx.log(_progress(rows[-1], ctx))
        del srcs_all, expected
    for row in rows:
        if row["wrong_total"]:
            failures.append(f"all_reduce {fmt_bytes(row['shape']['bytes'])} graph={row['graph']}: "
                            f"{row['wrong_total']} wrong elements {row['wrong']}")

    names = list(rows[0]["times_us"].keys()) if rows else []
    table = _table(ctx, rows, names, errors_seen)
    return OpResult(OP, rows, table, extra={"dtype": dtype_name(ctx.dtype), "methods": names},
                    summary=_summary(ctx, rows), failures=failures, plot=plot)


def _row(ctx, size, numel, graph, timings: Dict[str, Timing], expected_of_slot, factor,
         errors_seen) -> Dict[str, Any]:
    names = list(timings)
    wrong_local = [count_wrong_slots(timings[n], expected_of_slot) for n in names]
    wrong = [int(w) for w in ctx.timer.sum_over_ranks(wrong_local)]
    times = {n: timings[n].us for n in names}
    algbw = {n: (size / (t * 1e3) if t else None) for n, t in times.items()}
    busbw = {n: (v * factor if v is not None else None) for n, v in algbw.items()}
    row = {
        "shape": {"bytes": size, "count": numel},
        "dtype": dtype_name(ctx.dtype),
        "graph": bool(graph),
        "times_us": times,
        "algbw_GBs": algbw,
        "busbw_GBs": busbw,
        "wrong": {n: (w if timings[n].us is not None else None) for n, w in zip(names, wrong)},
        "wrong_total": sum(wrong),
        "path": timings["distfuse"].info.get("path") if "distfuse" in timings else None,
        "paths": {n: t.info.get("path") for n, t in timings.items() if t.info.get("path")},
    }
    return with_timing_details(row, timings, errors_seen)


def _progress(row, ctx) -> str:
    t = row["times_us"]
    parts = ", ".join(f"{k} {fmt(v)}" for k, v in t.items())
    return (f"  [all_reduce] {fmt_bytes(row['shape']['bytes'])} {'graph' if row['graph'] else 'eager'}: "
            f"{parts} us; wrong {row['wrong_total']}")


def _table(ctx, rows, names, errors_seen) -> Table:
    short = {"symm_one_shot": "symm 1-shot", "symm_two_shot": "symm 2-shot"}
    heads = ["size", "count", "type", "mode"] + [f"{short.get(n, n)} us" for n in names]
    heads += [f"busbw {ctx.backend}", "busbw distfuse", "distfuse path", "#wrong"]
    table = Table(heads)
    for r in rows:
        cells = [fmt_bytes(r["shape"]["bytes"]), str(r["shape"]["count"]), r["dtype"],
                 "graph" if r["graph"] else "eager"]
        cells += [forced_cell(fmt(r["times_us"].get(n)), n.split(":", 1)[-1], r.get("paths", {}).get(n))
                  if n.startswith("distfuse:") else fmt(r["times_us"].get(n)) for n in names]
        cells += [fmt(r["busbw_GBs"].get(ctx.backend)), fmt(r["busbw_GBs"].get("distfuse")),
                  str(r.get("path") or "n/a"), str(r["wrong_total"])]
        table.rows.append(cells)
    table.notes.append("Times in µs per call: max over ranks of each rank's median. busbw = algbw · 2(W-1)/W, "
                       "GB/s. #wrong: output elements differing from the exact sum, over all ranks and methods.")
    if ctx.timer.cuda:
        table.notes.append("graph rows: CUDA graph of back-to-back calls on distinct input buffers, time per call; "
                           "eager rows: device time (the host is let run ahead). L2 flushed before every sample.")
    for n, e in errors_seen.items():
        table.notes.append(f"{n}: n/a ({e})")
    return table


def _summary(ctx, rows) -> str:
    if not rows:
        return "all_reduce: no rows"
    wrong = sum(r["wrong_total"] for r in rows)
    base = ctx.backend
    picks = []
    for r in rows:
        t = r["times_us"]
        picks.append(f"{fmt_bytes(r['shape']['bytes'])}{' g' if r['graph'] else ''} "
                     f"{fmt(t.get('distfuse'))}/{fmt(t.get(base))}")
    if len(picks) > 6:
        picks = picks[:2] + picks[len(picks) // 2: len(picks) // 2 + 1] + picks[-2:]
    return f"all_reduce #wrong={wrong}; distfuse/{base} us: " + ", ".join(picks)


def plot(plt, rows, title):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    modes = sorted({r["graph"] for r in rows})
    names = list(rows[0]["times_us"].keys())
    for ax, key, label in ((axes[0], "times_us", "time per call (µs)"), (axes[1], "busbw_GBs", "bus bandwidth (GB/s)")):
        for mode in modes:
            sub = [r for r in rows if r["graph"] == mode]
            xs = [r["shape"]["bytes"] for r in sub]
            for n in names:
                ys = [r[key].get(n) for r in sub]
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if mode else "x",
                            linestyle="-" if mode else "--", label=f"{n} ({'graph' if mode else 'eager'})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return fig
