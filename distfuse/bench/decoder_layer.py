"""One Llama-3-70B tensor-parallel decoder layer (``distfuse.nn.llama.TPLlamaDecoderLayer``).

Hidden 8192, intermediate 28672, 64 query heads, 8 key/value heads, head_dim 128,
split over all ranks; random bf16 weights. Columns (µs per layer forward, max over
ranks of each rank's median): ``distfuse`` (the row-parallel projections go
through ``distfuse.matmul_all_reduce`` and its dispatcher) and ``reference``
(the same layer with its row-parallel linears computed as ``F.linear`` + in-place
NCCL ``all_reduce``: torch.matmul + NCCL). ``gain`` = (reference - distfuse) / reference.
With ``--paths``, one more column per schedule: the layer with every
``matmul_all_reduce`` call forced onto it (``df:<path>``).

M = B·S tokens: M <= 128 is a decode batch (B = M, S = 1), larger M one prefill
sequence (B = 1, S = M, causal attention over it).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from .all_reduce import ensure_workspace, last_path
from .matmul_all_reduce import forced_paths, output_errors
from .results import OpResult, Table, Unavailable, fmt, forced_cell
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
            timings = ctx.timer.run_all(methods, graph=graph)
            err = output_errors(ctx, timings, "reference", ["distfuse"])["distfuse"]
            t_df, t_ref = timings["distfuse"].us, timings["reference"].us
            row = {
                "shape": {"tokens": m, "B": b, "S": s, "hidden": h, "intermediate": dims["intermediate_size"],
                          "heads": hq, "kv_heads": hkv, "head_dim": dims["head_dim"]},
                "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(ctx.dtype, "fp32"),
                "graph": bool(graph),
                "times_us": {"distfuse": t_df, "reference": t_ref,
                             **{f"distfuse:{p}": timings[f"distfuse:{p}"].us for p in forced}},
                "path": timings["distfuse"].info.get("path"),
                "forced_ran": {p: timings[f"distfuse:{p}"].info.get("path") for p in forced},
                "gain_pct": (100.0 * (t_ref - t_df) / t_ref) if (t_df and t_ref) else None,
                "speedup": (t_ref / t_df) if (t_df and t_ref) else None,
                "rel_err": err,
                "samples": {k: v.samples for k, v in timings.items()},
                "host_us": {k: v.host_us for k, v in timings.items()},
            }
            errors = {k: v.error for k, v in timings.items() if v.error}
            if errors:
                row["errors"] = errors
                for k, e in errors.items():
                    errors_seen.setdefault(k, e)
            rows.append(row)
            ctx.log(f"  [decoder_layer] M={m} (B={b}, S={s}) {'graph' if graph else 'eager'}: distfuse "
                    f"{fmt(t_df)} us ({row['path']}), reference {fmt(t_ref)} us, gain {fmt(row['gain_pct'])}%, "
                    f"rel_err {fmt(err, 5)}")
            if err is not None and not (err <= tol):
                failures.append(f"decoder_layer M={m} graph={graph}: rel_err {err:.3g} > {tol}")
            xs.clear()  # frees the inputs (the closures above hold the list)

    layer = None  # frees the weights before the next op
    table = Table(["tokens M", "B", "S", "mode", "distfuse us", "path"] + [f"df:{p} us" for p in forced]
                  + ["reference us", "gain", "rel_err"])
    for r in rows:
        s = r["shape"]
        table.rows.append([str(s["tokens"]), str(s["B"]), str(s["S"]), "graph" if r["graph"] else "eager",
                           fmt(r["times_us"]["distfuse"]), str(r["path"] or "n/a")]
                          + [forced_cell(fmt(r["times_us"][f"distfuse:{p}"]), p, r["forced_ran"][p]) for p in forced]
                          + [fmt(r["times_us"]["reference"]),
                           (f"{r['gain_pct']:.1f}%" if r["gain_pct"] is not None else "n/a"),
                           (f"{r['rel_err']:.2e}" if r["rel_err"] is not None else "n/a")])
    table.notes.append(f"Layer: hidden {h}, intermediate {dims['intermediate_size']}, {hq} q / {hkv} kv heads, "
                       f"head_dim {dims['head_dim']}, TP over W = {ctx.world}. µs per forward (max over ranks "
                       f"of medians). reference: the same layer with F.linear + NCCL all_reduce. gain = "
                       f"(reference - distfuse) / reference. rel_err: distfuse vs reference output "
                       f"(tolerance {tol:g}).")
    for k, e in errors_seen.items():
        table.notes.append(f"{k}: n/a ({e})")
    summary = "decoder_layer gain: " + ", ".join(
        f"M={r['shape']['tokens']}{' g' if r['graph'] else ''} {fmt(r['gain_pct'])}%" for r in rows)
    return OpResult(OP, rows, table, extra={"dtype": rows[0]["dtype"] if rows else None,
                                            "layer": dims, "tolerance": tol},
                    summary=summary, failures=failures, plot=plot)


def plot(plt, rows, title):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"M={r['shape']['tokens']}{' (g)' if r['graph'] else ''}" for r in rows]
    x = list(range(len(rows)))
    ref = [r["times_us"]["reference"] or 0 for r in rows]
    df = [r["times_us"]["distfuse"] or 0 for r in rows]
    ax.bar([i - 0.2 for i in x], ref, width=0.4, label="reference (torch.matmul + NCCL)")
    ax.bar([i + 0.2 for i in x], df, width=0.4, label="distfuse")
    for i, r in enumerate(rows):
        if r["gain_pct"] is not None:
            ax.annotate(f"{r['gain_pct']:+.1f}%", (i + 0.2, df[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_yscale("log")
    ax.set_ylabel("µs per layer forward")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig
