"""One Llama-3-70B tensor-parallel decoder layer (``distfuse.nn.llama.TPLlamaDecoderLayer``).

Hidden 8192, intermediate 28672, 64 query heads, 8 key/value heads, head_dim 128,
split over all ranks; random bf16 weights. Columns (µs per layer forward, max over
ranks of each rank's median): ``distfuse`` (the row-parallel projections go
through ``distfuse.matmul_all_reduce`` and its dispatcher) and ``reference``
(the same layer with its row-parallel linears computed as ``F.linear`` + in-place
NCCL ``all_reduce``: torch.matmul + NCCL). ``gain`` = (reference - distfuse) / reference.
With ``--paths``, one more column per schedule: the layer with every
``matmul_all_reduce`` call forced onto it (``df:<path>``). With ``--compiled``, two
more: the reference layer compiled by Inductor (``compiled``) and compiled with the
``distfuse.compile`` pass (``compiled+pass``, its F.linear + all_reduce pairs rewritten
to the fused op); ``compile gain`` = (compiled - compiled+pass) / compiled.

M = B·S tokens: M <= 128 is a decode batch (B = M, S = 1), larger M one prefill
sequence (B = 1, S = M, causal attention over it).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from .all_reduce import ensure_workspace, last_path
from .matmul_all_reduce import forced_paths, output_errors
from .results import (OpResult, Table, Unavailable, dtype_name, fmt, fmt_err, fmt_pct, forced_cell, gain_pct,
                      with_timing_details)
from .timing import BenchContext, Method

OP = "decoder_layer"
FULL_TOKENS = [1, 128, 2048, 8192]
QUICK_TOKENS = [1, 2048]
CPU_TOKENS = [1, 16]
GRAPH_MAX_TOKENS = 128   # --graph auto: graph rows up to this many tokens
DECODE_MAX_TOKENS = 128  # up to this: B = M, S = 1; above: B = 1, S = M
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128)
# Small enough for a CPU reference run, with grouped key/value heads (2 query heads each) and
# 8 key/value heads, so that every W up to 8 divides it.
CPU_CONFIG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=16)
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-3}


def tokens_for(ctx: BenchContext) -> List[int]:
    given = ctx.options.get("tokens")
    if given:
        return list(given)
    if ctx.cpu:
        return CPU_TOKENS
    return QUICK_TOKENS if ctx.quick else FULL_TOKENS


def batch_seq(m: int):
    return (m, 1) if m <= DECODE_MAX_TOKENS else (1, m)


def set_fused(module: torch.nn.Module, fused: bool) -> None:
    """Switch every RowParallelLinear of `module` between the fused op and F.linear + NCCL."""
    from ..nn.linear import RowParallelLinear
    for sub in module.modules():
        if isinstance(sub, RowParallelLinear):
            sub.fused = fused


COMPILED = ("compiled", "compiled+pass")


def compiled_layers(layer: torch.nn.Module, config, ctx: BenchContext):
    """A copy of `layer` sharing its weights, with its row-parallel linears unfused
    (F.linear + NCCL all_reduce), compiled by Inductor as it is and with the
    distfuse.compile pass. Returns ({column: compiled layer}, the pass)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    from ..compile import MatmulAllReducePass, without_compile_caches
    from ..nn.llama import TPLlamaDecoderLayer
    unfused = TPLlamaDecoderLayer(config, group=ctx.group_name, dtype=ctx.dtype, device=ctx.device)
    unfused.load_state_dict(layer.state_dict(), assign=True)  # the same tensors
    set_fused(unfused, False)
    unfused.eval()
    fusion = MatmulAllReducePass()

    def inductor_with_pass(gm, example_inputs):
        # No graph from the caches: the pass (and its count) must see every graph.
        with inductor_config.patch(post_grad_custom_post_pass=fusion), without_compile_caches():
            return compile_fx(gm, example_inputs)

    # Two backends: Dynamo keeps a compiled graph per backend, so neither column runs the
    # other's code.
    return {"compiled": torch.compile(unfused), "compiled+pass": torch.compile(unfused, backend=inductor_with_pass)}, fusion


def run(ctx: BenchContext) -> OpResult:
    try:
        from ..nn.llama import LlamaConfig, TPLlamaDecoderLayer
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"distfuse.nn.llama is not importable: {type(exc).__name__}: {exc}") from exc
    import distfuse

    dims = CPU_CONFIG if ctx.cpu else LLAMA_70B
    hq, hkv = dims["num_attention_heads"], dims["num_key_value_heads"]
    if hq % ctx.world or hkv % ctx.world or dims["intermediate_size"] % ctx.world:
        raise Unavailable(f"heads ({hq} q, {hkv} kv) or intermediate size {dims['intermediate_size']} "
                          f"not divisible by W = {ctx.world}")
    config = LlamaConfig(**dims)
    torch.manual_seed(ctx.seed + 101 * ctx.rank)
    if ctx.device.type == "cuda":
        torch.cuda.manual_seed(ctx.seed + 101 * ctx.rank)
    with torch.no_grad():
        layer = TPLlamaDecoderLayer(config, group=ctx.group_name, dtype=ctx.dtype, device=ctx.device)
        # Norm weights start at one: make them random too (all ranks equal: replicated weights).
        g = ctx.generator(ctx.seed + 7)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            w = torch.rand(norm.weight.shape, generator=g, device=ctx.device, dtype=torch.float32) + 0.5
            norm.weight.copy_(w.to(norm.weight.dtype))
    layer.eval()

    tokens = tokens_for(ctx)
    h = dims["hidden_size"]
    max_out = max(tokens) * h * torch.empty((), dtype=ctx.dtype).element_size()
    ensure_workspace(ctx, max_out)
    tol = TOLERANCE.get(ctx.dtype, 5e-2)
    # Schedules of --paths forced onto the layer's matmul_all_reduce calls, a column each;
    # none unless given (the runs of record time the dispatcher's choice).
    forced = forced_paths(ctx, default=())
    compiled = {}
    if ctx.options.get("compiled"):
        compiled, fusion = compiled_layers(layer, config, ctx)

    rows: List[Dict[str, Any]] = []
    failures: List[str] = []
    errors_seen: Dict[str, str] = {}
    for m in tokens:
        b, s = batch_seq(m)
        for graph in ctx.graph_variants(m <= GRAPH_MAX_TOKENS):
            slots = ctx.timer.config.calls_per_graph if graph else 1
            # Replicated activations: the same input on every rank (seed without the rank).
            xs = [ctx.randn([b, s, h], ctx.seed * 13 + m * 7 + i) for i in range(slots)]

            def fwd(slot):
                with torch.no_grad():
                    return layer(xs[slot])

            def ref(slot):
                # The same layer computed the unfused way: F.linear + in-place NCCL all_reduce.
                set_fused(layer, False)
                try:
                    with torch.no_grad():
                        return layer(xs[slot])
                finally:
                    set_fused(layer, True)

            def forced_fwd(slot, schedule):
                with distfuse.force_path("matmul_all_reduce", schedule):
                    return fwd(slot)

            def path():
                return {"path": last_path("matmul_all_reduce", ctx)}

            methods = [Method("distfuse", fwd, slots=slots, info=path),
                       Method("reference", ref, slots=slots, info=path)]
            methods += [Method(f"distfuse:{p}", lambda slot, p=p: forced_fwd(slot, p), slots=slots, info=path)
                        for p in forced]
            for name, fn in compiled.items():
                with torch.no_grad():
                    fn(xs[0])  # compiles for this shape, outside the timed runs and any graph capture

                def compiled_fwd(slot, fn=fn):
                    with torch.no_grad():
                        return fn(xs[slot])
                methods.append(Method(name, compiled_fwd, slots=slots, info=path if name == "compiled+pass" else None))
            if compiled and fusion.rewrites < 2:
                failures.append(f"decoder_layer M={m}: the compile pass rewrote {fusion.rewrites} of the layer's "
                                f"2 row-parallel linears")
            timings = ctx.timer.run_all(methods, graph=graph)
            compiled_errs = output_errors(ctx, timings, "reference", ["distfuse", *compiled])
            err = compiled_errs.pop("distfuse")
            t_df, t_ref = timings["distfuse"].us, timings["reference"].us
            row = {
                "shape": {"tokens": m, "B": b, "S": s, "hidden": h, "intermediate": dims["intermediate_size"],
                          "heads": hq, "kv_heads": hkv, "head_dim": dims["head_dim"]},
                "dtype": dtype_name(ctx.dtype),
                "graph": bool(graph),
                "times_us": {"distfuse": t_df, "reference": t_ref,
                             **{f"distfuse:{p}": timings[f"distfuse:{p}"].us for p in forced},
                             **{name: timings[name].us for name in compiled}},
                "path": timings["distfuse"].info.get("path"),
                "forced_ran": {p: timings[f"distfuse:{p}"].info.get("path") for p in forced},
                "gain_pct": gain_pct(t_ref, t_df),
                "speedup": (t_ref / t_df) if (t_df and t_ref) else None,
                "rel_err": err,
                **({"compiled_path": timings["compiled+pass"].info.get("path"),
                    "compiled_rel_err": compiled_errs,
                    "compile_gain_pct": gain_pct(timings["compiled"].us, timings["compiled+pass"].us)}
                   if compiled else {}),
            }
            rows.append(with_timing_details(row, timings, errors_seen))
            ctx.log(f"  [decoder_layer] M={m} (B={b}, S={s}) {'graph' if graph else 'eager'}: distfuse "
                    f"{fmt(t_df)} us ({row['path']}), reference {fmt(t_ref)} us, gain {fmt(row['gain_pct'])}%, "
                    f"rel_err {fmt(err, 5)}")
            for name, e in [("distfuse", err), *compiled_errs.items()]:
                if e is not None and not (e <= tol):
                    failures.append(f"decoder_layer M={m} graph={graph} {name}: rel_err {e:.3g} > {tol}")
            if compiled:
                ctx.log(f"  [decoder_layer] M={m} compiled {fmt(row['times_us']['compiled'])} us, compiled+pass "
                        f"{fmt(row['times_us']['compiled+pass'])} us ({row['compiled_path']}), gain "
                        f"{fmt(row['compile_gain_pct'])}%")
            xs.clear()  # frees the inputs (the closures above hold the list)

    layer = compiled = None  # frees the weights before the next op
    compiled_cols = list(COMPILED) if rows and "compile_gain_pct" in rows[0] else []
    table = Table(["tokens M", "B", "S", "mode", "distfuse us", "path"] + [f"df:{p} us" for p in forced]
                  + ["reference us", "gain", "rel_err"]
                  + [f"{c} us" for c in compiled_cols] + (["compile gain"] if compiled_cols else []))
    for r in rows:
        s = r["shape"]
        table.rows.append([str(s["tokens"]), str(s["B"]), str(s["S"]), "graph" if r["graph"] else "eager",
                           fmt(r["times_us"]["distfuse"]), str(r["path"] or "n/a")]
                          + [forced_cell(fmt(r["times_us"][f"distfuse:{p}"]), p, r["forced_ran"][p]) for p in forced]
                          + [fmt(r["times_us"]["reference"]),
                           fmt_pct(r["gain_pct"]),
                           fmt_err(r["rel_err"])]
                          + [fmt(r["times_us"][c]) for c in compiled_cols]
                          + ([fmt_pct(r["compile_gain_pct"])] if compiled_cols else []))
    table.notes.append(f"Layer: hidden {h}, intermediate {dims['intermediate_size']}, {hq} q / {hkv} kv heads, "
                       f"head_dim {dims['head_dim']}, TP over W = {ctx.world}. µs per forward (max over ranks "
                       f"of medians). reference: the same layer with F.linear + NCCL all_reduce. gain = "
                       f"(reference - distfuse) / reference. rel_err: distfuse vs reference output "
                       f"(tolerance {tol:g}).")
    if compiled_cols:
        table.notes.append("compiled: the reference layer compiled by Inductor (torch.compile); compiled+pass: "
                           "the same with the distfuse.compile pass, which turns its F.linear + all_reduce pairs "
                           "into distfuse.matmul_all_reduce. compile gain = (compiled - compiled+pass) / compiled.")
    for k, e in errors_seen.items():
        table.notes.append(f"{k}: n/a ({e})")
    summary = "decoder_layer gain: " + ", ".join(
        f"M={r['shape']['tokens']}{' g' if r['graph'] else ''} {fmt(r['gain_pct'])}%" for r in rows)
    if compiled_cols:
        summary += "; compiled, gain of the pass: " + ", ".join(
            f"M={r['shape']['tokens']}{' g' if r['graph'] else ''} {fmt(r['compile_gain_pct'])}%" for r in rows)
    return OpResult(OP, rows, table, extra={"dtype": rows[0]["dtype"] if rows else None,
                                            "layer": dims, "tolerance": tol},
                    summary=summary, failures=failures, plot=plot)


def plot(plt, rows, title):
    return paired_bars(plt, rows, title, "reference", "reference (torch.matmul + NCCL)")


def paired_bars(plt, rows, title, baseline: str, baseline_label: str, ylabel: str = "µs per layer forward"):
    """µs per forward of `baseline` and distfuse, a pair of bars per row (log scale),
    each distfuse bar labelled with the row's gain_pct."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"M={r['shape']['tokens']}{' (g)' if r['graph'] else ''}" for r in rows]
    x = list(range(len(rows)))
    ref = [r["times_us"][baseline] or 0 for r in rows]
    df = [r["times_us"]["distfuse"] or 0 for r in rows]
    ax.bar([i - 0.2 for i in x], ref, width=0.4, label=baseline_label)
    ax.bar([i + 0.2 for i in x], df, width=0.4, label="distfuse")
    for i, r in enumerate(rows):
        if r["gain_pct"] is not None:
            ax.annotate(f"{r['gain_pct']:+.1f}%", (i + 0.2, df[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig
