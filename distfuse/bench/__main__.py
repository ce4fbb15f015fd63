"""``distfuse-bench`` / ``python -m distfuse.bench``: the benchmark launcher.

Starts one process per GPU (NCCL; file:// rendezvous in a temporary directory),
or, without a GPU, two CPU processes over gloo running small shapes through the
reference path (labelled as a CPU reference run, not a performance
measurement). Rank 0 prints one table per op and writes
``<output-dir>/<op>_<gpu>_w<W>.{json,md,png}``; the launcher prints a short
summary at the end and exits with 1 when a correctness check failed or an op
could not run.

Examples::

    distfuse-bench                                   # matmul_all_reduce, all GPUs
    distfuse-bench --op all --quick                  # every op, few sizes
    distfuse-bench --op all_reduce --sizes 4K 1M 64M --graph on
    distfuse-bench --op matmul_all_reduce --m 1 128 --shapes o_proj --world-size 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import traceback
from typing import Any, Dict, List, Optional, Tuple

# NVLink multicast stays off in every process (DESIGN.md, machines).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
OPS = ("matmul_all_reduce", "all_reduce", "decoder_layer", "hf_llama")
DEFAULT_OUTPUT = os.path.join("benchmarks", "results")


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 4K, 1M, 256MB)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2)]


def _split(values: Optional[List[str]], conv) -> Optional[List[Any]]:
    if not values:
        return None
    out = []
    for v in values:
        out += [conv(x) for x in str(v).split(",") if x.strip()]
    return out


def _tune_item(text: str) -> Tuple[str, List[int]]:
    """``KEY=V1,V2`` of --tune: a dispatch-table key and the values to sweep."""
    from ..ops import TUNING_KEYS
    key, _, values = text.partition("=")
    if key not in TUNING_KEYS:
        raise argparse.ArgumentTypeError(f"key must be one of {', '.join(TUNING_KEYS)}, got {key!r}")
    try:
        ints = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: values must be integers, e.g. {key}=16,32") from None
    if not ints or min(ints) < 1:
        raise argparse.ArgumentTypeError(f"{text}: give one or more integers >= 1")
    return key, ints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distfuse-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..ops import PATHS
    from .matmul_all_reduce import FORCED_PATHS
    p.add_argument("--op", choices=OPS + ("all",), default="matmul_all_reduce")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes (default: every visible GPU; 2 on a machine without GPU)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--m", nargs="+", default=None, help="matmul_all_reduce: M values (tokens), e.g. 1 128 2048")
    p.add_argument("--shapes", nargs="+", default=None, choices=("o_proj", "down_proj"),
                   help="matmul_all_reduce: Llama-3-70B row-parallel layers")
    p.add_argument("--paths", nargs="+", default=None, choices=FORCED_PATHS,
                   help="matmul_all_reduce: the forced-path columns to time (default: every schedule)")
    p.add_argument("--sizes", nargs="+", default=None, help="all_reduce: sizes in bytes (4K, 1M, 256MB, ...)")
    p.add_argument("--tokens", nargs="+", default=None, help="decoder_layer, hf_llama: tokens M = B*S")
    p.add_argument("--compiled", action="store_true",
                   help="decoder_layer: also the F.linear + NCCL layer compiled by Inductor, without and "
                        "with the distfuse.compile pass")
    p.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                   help="auto: CUDA graphs for short ops (all_reduce <= 4 MB also eager, matmul M <= 512, "
                        "decoder M <= 128); on: graphs everywhere; off: eager only")
    p.add_argument("--iters", type=int, default=None, help="timed samples per method (GPU 100, CPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed samples first (GPU 10, CPU 2)")
    p.add_argument("--graph-calls", type=int, default=10, help="calls captured back to back in one graph")
    p.add_argument("--no-flush", action="store_true", help="do not flush the L2 before every sample")
    p.add_argument("--no-interleave", action="store_true",
                   help="take each column's samples in one stretch instead of going round the columns")
    p.add_argument("--max-seconds", type=float, default=None, help="per method: bound on timed samples")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT)
    p.add_argument("--quick", action="store_true", help="few sizes and samples (smoke test)")
    p.add_argument("--cpu", action="store_true", help="CPU reference run even where GPUs exist")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=int, default=900, help="process-group timeout in seconds")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of methods that fail")
    p.add_argument("--tune", action="append", default=[], type=_tune_item, metavar="KEY=V1,V2",
                   help="tuning sweep: an extra column for every combination of these dispatch-table "
                        "values, run on --tune-path; keys: distfuse.ops.TUNING_KEYS (repeatable)")
    p.add_argument("--tune-path", default=None, choices=sorted({x for paths in PATHS.values() for x in paths}),
                   help="path the --tune columns force (default: all_reduce auto, matmul_all_reduce "
                        "fused_tiles; e.g. chunked with matmul_all_reduce.chunks)")
    return p


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """Plain options (picklable) for the workers."""
    import torch
    n_gpu = torch.cuda.device_count() if (torch.cuda.is_available() and not args.cpu) else 0
    gpu = n_gpu > 0
    world = args.world_size or (n_gpu if gpu else 2)
    if world < 1:
        raise SystemExit("distfuse-bench: --world-size must be >= 1")
    if gpu and world > n_gpu:
        raise SystemExit(f"distfuse-bench: --world-size {world} but only {n_gpu} GPU(s) are visible")
    ops = list(OPS) if args.op == "all" else [args.op]
    quick = bool(args.quick)
    if gpu:
        iters = args.iters or (30 if quick else 100)
        warmup = args.warmup if args.warmup is not None else (5 if quick else 10)
        max_seconds = args.max_seconds or (1.0 if quick else 3.0)
    else:
        iters = args.iters or (5 if quick else 10)
        warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
        max_seconds = args.max_seconds or 0.5
    return {
        "gpu": gpu, "world": world, "ops": ops, "explicit_op": args.op != "all", "dtype": args.dtype,
        "m": _split(args.m, int), "shapes": args.shapes, "sizes": _split(args.sizes, _parse_size),
        "tokens": _split(args.tokens, int), "graph": args.graph, "iters": iters, "warmup": warmup,
        "graph_calls": max(1, args.graph_calls), "flush": not args.no_flush, "interleave": not args.no_interleave,
        "max_seconds": max_seconds,
        "output_dir": os.path.abspath(args.output_dir), "quick": quick, "seed": args.seed,
        "timeout": args.timeout, "verbose": args.verbose, "tune": dict(args.tune), "tune_path": args.tune_path,
        "paths": args.paths, "compiled": bool(args.compiled),
    }


def _worker(rank: int, opts: Dict[str, Any], init_file: str, report_file: str) -> None:
    os.environ.update(SAFE_ENV)
    import torch
    import torch.distributed as dist

    world = opts["world"]
    timeout = datetime.timedelta(seconds=opts["timeout"])
    if opts["gpu"]:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timeout, device_id=device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timeout)
    try:
        _run_ops(rank, world, device, opts, report_file)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _run_ops(rank, world, device, opts, report_file) -> None:
    import torch.distributed as dist

    import distfuse  # noqa: F401  (loads the ops)
    from . import all_reduce, decoder_layer, hf_llama, matmul_all_reduce, results
    from .timing import DTYPES, BenchContext, Timer, TimingConfig, set_verbose

    set_verbose(opts["verbose"])
    cfg = TimingConfig(iters=opts["iters"], warmup=opts["warmup"], calls_per_graph=opts["graph_calls"],
                       flush_l2=opts["flush"], interleave=opts["interleave"], max_seconds=opts["max_seconds"],
                       min_iters=min(10, opts["iters"]))
    group = dist.group.WORLD
    timer = Timer(group, cfg, device)
    ctx = BenchContext(rank=rank, world=world, group=group, group_name=group.group_name, device=device,
                       dtype=DTYPES[opts["dtype"]], timer=timer, graph_mode=opts["graph"], quick=opts["quick"],
                       seed=opts["seed"], options={k: opts[k] for k in ("m", "shapes", "sizes", "tokens", "tune", "tune_path",
                                                                   "paths", "compiled")})
    env = results.environment(device)
    modules = {"all_reduce": all_reduce, "matmul_all_reduce": matmul_all_reduce, "decoder_layer": decoder_layer,
               "hf_llama": hf_llama}
    report: List[Dict[str, Any]] = []
    if rank == 0:
        head = f"distfuse-bench: {env['gpu_name']} x {world}, torch {env['torch']}, NCCL {env['nccl']}, " \
               f"dtype {opts['dtype']}, distfuse build {env['build']}, ops {', '.join(opts['ops'])}"
        print(head, flush=True)
        if env["cpu_reference"]:
            print(results.CPU_LABEL, flush=True)
    for op in opts["ops"]:
        entry: Dict[str, Any] = {"op": op}
        try:
            res = modules[op].run(ctx)
        except results.Unavailable as exc:
            entry.update(skipped=str(exc), failed=opts["explicit_op"])
            ctx.log(f"distfuse-bench: {op} skipped: {exc}")
            report.append(entry)
            continue
        except Exception as exc:  # noqa: BLE001  (the next op still runs)
            entry.update(error=f"{type(exc).__name__}: {exc}", failed=True)
            print(f"[rank {rank}] distfuse-bench: {op} failed:\n{traceback.format_exc()}", flush=True)
            report.append(entry)
            continue
        if rank == 0:
            extra = dict(res.extra)
            extra["config"] = {"iters": cfg.iters, "warmup": cfg.warmup, "calls_per_graph": cfg.calls_per_graph,
                               "flush_l2": cfg.flush_l2 and timer.cuda, "interleave": cfg.interleave,
                               "graph": opts["graph"], "quick": opts["quick"]}
            extra["notes"] = res.table.notes
            paths = results.write_results(op, res.rows, env, world, res.table, opts["output_dir"],
                                          extra=extra, plot=res.plot)
            print("\n" + paths.pop("markdown"), flush=True)
            bars_line = paths.pop("bars")
            entry.update(files=paths, summary=res.summary, failures=res.failures, failed=bool(res.failures),
                         bars=bars_line)
        report.append(entry)
        dist.barrier()
    if rank == 0:
        with open(report_file, "w") as f:
            json.dump({"env": env, "world": world, "ops": report}, f)


def launch(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmarks (spawns the ranks); returns rank 0's report:
    {"ok": bool, "env": {...}, "world": W, "ops": [{"op", "files", "summary", "failures", ...}]}."""
    args = build_parser().parse_args(argv)
    os.environ.update(SAFE_ENV)
    opts = resolve(args)
    import importlib

    import torch.multiprocessing as mp

    # Under `python -m` this file runs as __main__, which spawned processes cannot import
    # by that name: hand them the worker of the importable module instead.
    worker = importlib.import_module("distfuse.bench.__main__")._worker
    with tempfile.TemporaryDirectory(prefix="distfuse-bench-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        report_file = os.path.join(tmp, "report.json")
        error = None
        try:
            mp.start_processes(worker, args=(opts, init_file, report_file), nprocs=opts["world"],
                               join=True, start_method="spawn")
        except Exception as exc:  # noqa: BLE001  (a rank crashed: report it, exit 1)
            error = f"{type(exc).__name__}: {exc}"
        report: Dict[str, Any] = {"ops": []}
        if os.path.exists(report_file):
            with open(report_file) as f:
                report = json.load(f)
    report["opts"] = opts
    if error:
        report["error"] = error
    report["ok"] = not error and bool(report["ops"]) and not any(e.get("failed") for e in report["ops"])
    return report


def format_summary(report: Dict[str, Any]) -> str:
    from .results import CPU_LABEL
    env = report.get("env") or {}
    lines = [f"==== distfuse-bench summary: {env.get('gpu_name', '?')} x {report.get('world', '?')} ===="]
    if env.get("cpu_reference"):
        lines.append(CPU_LABEL)
    for e in report.get("ops", []):
        if "skipped" in e:
            lines.append(f"SKIPPED {e['op']}: {e['skipped']}")
        elif "error" in e:
            lines.append(f"ERROR {e['op']}: {e['error']}")
        else:
            lines.append(f"SUMMARY {e.get('summary', e['op'])}")
            lines.append(f"  files: {e['files'].get('json')} (+ .md{', .png' if 'png' in e['files'] else ''})")
            if e.get("bars"):  # performance targets: reported, not a failure
                lines.append(e["bars"][:1500])
            for f in e.get("failures", [])[:10]:
                lines.append(f"  FAIL {f}")
    if report.get("error"):
        lines.append(f"ERROR a rank failed: {report['error']}")
    lines.append("RESULT " + ("ok" if report.get("ok") else "FAILED"))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    report = launch(argv)
    print(format_summary(report), flush=True)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
