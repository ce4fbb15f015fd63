"""``python -m distfuse.bench.timeline``: what one matmul_all_reduce call does on the GPU.

Runs a schedule on W GPUs (one process each), profiles a few calls with
torch.profiler and prints, for rank 0, every kernel and copy of the last call by
start time and stream, then the busy time of each stream. Design data for the
overlapped schedules (benchmarks/NOTES.md), not a benchmark: the profiler adds its
own overhead and nothing is compared side by side.

    python -m distfuse.bench.timeline --path band_pull --shape o_proj --m 8192 --world-size 4
    python -m distfuse.bench.timeline --path copy_engine --shape down_proj --m 8192 \\
        --tune matmul_all_reduce.band_reduce_blocks=8 --output /tmp/timeline.txt
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Dict, List

from .__main__ import SAFE_ENV, _tune_item
from .matmul_all_reduce import HIDDEN, INTERMEDIATE

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LEAD_CYCLES = 40_000_000  # about 20 ms at H100/H200 clocks: longer than the host's enqueue


def _tune_pair(text: str):
    """KEY=N: --tune of distfuse-bench with a single value."""
    key, values = _tune_item(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text}: one value per key here, e.g. {key}={values[0]}")
    return key, values[0]


def build_parser() -> argparse.ArgumentParser:
    from ..ops import PATHS
    p = argparse.ArgumentParser(prog="python -m distfuse.bench.timeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="auto", choices=PATHS["matmul_all_reduce"])
    p.add_argument("--shape", default="o_proj", choices=("o_proj", "down_proj"))
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--world-size", type=int, default=None, help="GPUs (default: all visible)")
    p.add_argument("--calls", type=int, default=3, help="profiled calls; the last one is printed")
    p.add_argument("--tune", action="append", default=[], type=_tune_pair, metavar="KEY=N")
    p.add_argument("--output", default=None, help="also write the text here")
    return p


def timeline_lines(events: List[dict], title: str) -> List[str]:
    """The events of the last call (from its GEMM on; all of them when there is
    none) by start time, then each stream's busy time."""
    events = sorted(events, key=lambda e: e["ts"])
    gemms = [i for i, e in enumerate(events) if "gemm" in e["name"].lower()]
    last = events[gemms[-1]:] if gemms else events
    t0 = last[0]["ts"]
    lines = [f"== {title}: {len(last)} device events, {max(e['ts'] + e['dur'] for e in last) - t0:.1f} us",
             f"{'start us':>9} {'dur us':>8} {'stream':>6}  name"]
    busy: Dict[str, float] = {}
    for e in last:
        stream = str(e.get("tid"))
        busy[stream] = busy.get(stream, 0.0) + e["dur"]
        lines.append(f"{e['ts'] - t0:9.1f} {e['dur']:8.1f} {stream:>6}  {e['name'][:90]}")
    lines.append("busy per stream (us): " + ", ".join(f"{s}: {t:.1f}" for s, t in sorted(busy.items())))
    return lines


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    os.environ.update(SAFE_ENV)
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    import distfuse
    from distfuse.ops import force_path
    group = dist.group.WORLD.group_name
    k_total = HIDDEN if args.shape == "o_proj" else INTERMEDIATE
    k, n = k_total // world, HIDDEN
    distfuse.init_workspace(group, max_bytes=args.m * n * 2)
    torch.manual_seed(rank)
    a = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    b = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k_total)).t()

    def call():
        with force_path("matmul_all_reduce", args.path), distfuse.tuning(dict(args.tune)):
            return distfuse.matmul_all_reduce(a, b, group)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            dist.barrier()
            # The GPU sleeps while the host enqueues the call, so that the call starts
            # when the barrier ends on every rank, not when a rank's host (slowed by
            # the profiler) gets there.
            torch.cuda._sleep(LEAD_CYCLES)
            call()
        torch.cuda.synchronize()
    taken = distfuse.last_path("matmul_all_reduce")
    if rank == 0:
        trace = os.path.join(os.path.dirname(init_file), "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"]
                      if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
        tune = " ".join(f"{key}={v}" for key, v in args.tune)
        title = (f"{torch.cuda.get_device_name()} W={world} {args.shape} M={args.m} path={taken}"
                 + (f" {tune}" if tune else ""))
        text = "\n".join(timeline_lines(events, title)) + "\n"
        print(text, end="")
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import torch.multiprocessing as mp
    if not torch.cuda.is_available():
        print("distfuse.bench.timeline: needs CUDA GPUs (none visible)", file=sys.stderr)
        return 2
    world = args.world_size or torch.cuda.device_count()
    if not 2 <= world <= torch.cuda.device_count():
        print(f"distfuse.bench.timeline: --world-size must be in [2, {torch.cuda.device_count()}], got {world}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "rendezvous"), args), nprocs=world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
