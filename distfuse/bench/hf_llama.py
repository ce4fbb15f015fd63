"""A HuggingFace transformers Llama with Llama-3-70B layer shapes, tensor-parallel two ways.

The same random checkpoint (one decoder layer: hidden 8192, intermediate 28672, 64 query
and 8 key/value heads; a 32000-token vocabulary) is loaded on every rank twice:
``transformers_tp`` with transformers' own tensor parallelism (``tp_plan="auto"``: DTensor
weights, an NCCL all-reduce after o_proj and down_proj) and ``distfuse`` with
``distfuse.integrations.transformers.tensor_parallel`` (the same sharding, o_proj and
down_proj as ``distfuse.matmul_all_reduce``). Columns: µs per forward of the base model
(embeddings, the decoder layer, the final norm; no LM head, whose sharding the two
differ in), max over ranks of each rank's median. ``gain`` = (transformers_tp -
distfuse) / transformers_tp. rel_err: distfuse's last hidden state against
transformers_tp's. M = B·S tokens as in the decoder_layer benchmark; rows up to 128
tokens are timed eager and graph-captured.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from .all_reduce import ensure_workspace, last_path
from .decoder_layer import CPU_CONFIG, GRAPH_MAX_TOKENS, LLAMA_70B, TOLERANCE, batch_seq, paired_bars, tokens_for
from .matmul_all_reduce import output_errors
from .results import OpResult, Table, Unavailable, dtype_name, fmt, fmt_err, fmt_pct, gain_pct, with_timing_details
from .timing import BenchContext, Method

OP = "hf_llama"
VOCAB = 32000
CPU_VOCAB = 512


def _checkpoint(ctx: BenchContext, config) -> str:
    """Rank 0 writes a random checkpoint of `config` to a fresh folder; every rank gets its path."""
    from transformers import LlamaForCausalLM
    path = [None]
    if ctx.rank == 0:
        path[0] = tempfile.mkdtemp(prefix="distfuse-hf-llama-")
        torch.manual_seed(ctx.seed)
        with torch.device(ctx.device):
            LlamaForCausalLM(config).to(ctx.dtype).save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0, group=ctx.group)
    return path[0]


def _models(ctx: BenchContext, path: str):
    """(transformers' tensor-parallel model, distfuse's) from the checkpoint at `path`."""
    from transformers import LlamaForCausalLM

    from ..integrations.transformers import tensor_parallel
    # transformers reads the launcher's variables: without RANK and WORLD_SIZE some versions
    # load the whole model on every rank; LOCAL_RANK names the device of the shards.
    os.environ.update(RANK=str(ctx.rank), WORLD_SIZE=str(ctx.world),
                      LOCAL_RANK=str(ctx.device.index if ctx.device.type == "cuda" else 0))
    try:
        from transformers.distributed import DistributedConfig
        tp = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:  # before transformers 5.17
        tp = {"tp_plan": "auto"}
    hf_tp = LlamaForCausalLM.from_pretrained(path, dtype=ctx.dtype, **tp).eval()
    # The plan places the sharded weights only; the replicated ones (embeddings, norms) may
    # stay on the CPU.
    hf_tp.to(ctx.device)
    for name, p in hf_tp.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.device != ctx.device:
            raise RuntimeError(f"hf_llama: transformers_tp's {name} is on {local.device}, not {ctx.device}")
    # The baseline must really be tensor-parallel: q_proj holds this rank's heads only.
    q = hf_tp.model.layers[0].self_attn.q_proj.weight
    local_rows = (q.to_local() if hasattr(q, "to_local") else q).shape[0]
    if ctx.world > 1 and local_rows * ctx.world != q.shape[0]:
        raise RuntimeError(f"hf_llama: transformers did not shard the model (q_proj holds {local_rows} of "
                           f"{q.shape[0]} rows on each of {ctx.world} ranks)")
    ours = tensor_parallel(LlamaForCausalLM.from_pretrained(path, dtype=ctx.dtype).to(ctx.device).eval(),
                           ctx.group_name)
    return hf_tp, ours


def run(ctx: BenchContext) -> OpResult:
    try:
        import accelerate  # noqa: F401  (transformers' tp_plan needs it)
        from transformers import LlamaConfig
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"transformers or accelerate is not importable: {type(exc).__name__}: {exc}") from exc

    dims = CPU_CONFIG if ctx.cpu else LLAMA_70B
    if dims["num_key_value_heads"] % ctx.world or dims["intermediate_size"] % ctx.world:
        raise Unavailable(f"heads or intermediate size not divisible by W = {ctx.world}")
    config = LlamaConfig(vocab_size=CPU_VOCAB if ctx.cpu else VOCAB, num_hidden_layers=1,
                         max_position_embeddings=16384, **dims)
    path = _checkpoint(ctx, config)
    try:
        hf_tp, ours = _models(ctx, path)
    finally:
        dist.barrier(group=ctx.group)
        if ctx.rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    tokens = tokens_for(ctx)
    ensure_workspace(ctx, max(tokens) * dims["hidden_size"] * torch.empty((), dtype=ctx.dtype).element_size())
    tol = TOLERANCE.get(ctx.dtype, 5e-2)
    rows: List[Dict[str, Any]] = []
    failures: List[str] = []
    errors_seen: Dict[str, str] = {}
    for m in tokens:
        b, s = batch_seq(m)
        # Decode rows eager too: the host work of each forward (DTensor's dispatch, the
        # layers' Python) shows there, and HF models mostly run eager.
        for graph in ctx.graph_variants(m <= GRAPH_MAX_TOKENS, both_when_small=True):
            slots = ctx.timer.config.calls_per_graph if graph else 1
            gen = ctx.generator(ctx.seed * 17 + m)  # the same tokens on every rank
            ids = [torch.randint(0, config.vocab_size, (b, s), generator=gen, device=ctx.device)
                   for _ in range(slots)]

            def forward(model, slot):
                with torch.no_grad():
                    return model.model(input_ids=ids[slot], use_cache=False).last_hidden_state

            def path_info():
                return {"path": last_path("matmul_all_reduce", ctx)}

            timings = ctx.timer.run_all([
                Method("distfuse", lambda slot: forward(ours, slot), slots=slots, info=path_info),
                Method("transformers_tp", lambda slot: forward(hf_tp, slot), slots=slots)], graph=graph)
            err = output_errors(ctx, timings, "transformers_tp", ["distfuse"])["distfuse"]
            t_df, t_hf = timings["distfuse"].us, timings["transformers_tp"].us
            row = {
                "shape": {"tokens": m, "B": b, "S": s, "hidden": dims["hidden_size"],
                          "intermediate": dims["intermediate_size"], "heads": dims["num_attention_heads"],
                          "kv_heads": dims["num_key_value_heads"], "layers": 1, "vocab": config.vocab_size},
                "dtype": dtype_name(ctx.dtype),
                "graph": bool(graph),
                "times_us": {"distfuse": t_df, "transformers_tp": t_hf},
                "path": timings["distfuse"].info.get("path"),
                "gain_pct": gain_pct(t_hf, t_df),
                "rel_err": err,
            }
            rows.append(with_timing_details(row, timings, errors_seen))
            ctx.log(f"  [hf_llama] M={m} {'graph' if graph else 'eager'}: distfuse {fmt(t_df)} us "
                    f"({row['path']}), transformers_tp {fmt(t_hf)} us, gain {fmt(row['gain_pct'])}%, "
                    f"rel_err {fmt(err, 5)}")
            if err is not None and not (err <= tol):
                failures.append(f"hf_llama M={m} graph={graph}: rel_err {err:.3g} > {tol}")
            ids.clear()

    hf_tp = ours = None  # frees the weights before the next op
    table = Table(["tokens M", "B", "S", "mode", "distfuse us", "path", "transformers_tp us", "gain", "rel_err"])
    for r in rows:
        sh = r["shape"]
        table.rows.append([str(sh["tokens"]), str(sh["B"]), str(sh["S"]), "graph" if r["graph"] else "eager",
                           fmt(r["times_us"]["distfuse"]), str(r["path"] or "n/a"),
                           fmt(r["times_us"]["transformers_tp"]), fmt_pct(r["gain_pct"]),
                           fmt_err(r["rel_err"])])
    table.notes.append(f"transformers LlamaForCausalLM base model (embeddings, 1 decoder layer: hidden "
                       f"{dims['hidden_size']}, intermediate {dims['intermediate_size']}, "
                       f"{dims['num_attention_heads']} q / {dims['num_key_value_heads']} kv heads; final norm), "
                       f"TP over W = {ctx.world}. transformers_tp: loaded with tp_plan=\"auto\"; distfuse: "
                       f"distfuse.integrations.transformers.tensor_parallel. µs per forward (max over ranks of "
                       f"medians). gain = (transformers_tp - distfuse) / transformers_tp. rel_err: distfuse vs "
                       f"transformers_tp (tolerance {tol:g}).")
    for k, e in errors_seen.items():
        table.notes.append(f"{k}: n/a ({e})")
    summary = "hf_llama gain over transformers' TP: " + ", ".join(
        f"M={r['shape']['tokens']}{' g' if r['graph'] else ''} {fmt(r['gain_pct'])}%" for r in rows)
    return OpResult(OP, rows, table, extra={"dtype": rows[0]["dtype"] if rows else None, "layer": dims,
                                            "tolerance": tol}, summary=summary, failures=failures, plot=plot)


def plot(plt, rows, title):
    return paired_bars(plt, rows, title, "transformers_tp", "transformers tp_plan (DTensor + NCCL)",
                       ylabel="µs per base-model forward (1 layer)")
