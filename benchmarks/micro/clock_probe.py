"""SM clocks and board power while a row-parallel GEMM runs alone, fused with its
all-reduce, and followed by it: does the fused path's stretch of the GEMM come with a
lower SM clock (a power cap), or at the same clock (the memory system)?

    python3 benchmarks/micro/clock_probe.py [--m 8192] [--k 4096] [--n 8192] [--seconds 3]
                                            [--paths pair_exchange,band_pull] [--world-size W]
                                            [--tune KEY=V1,V2] [--rounds R] [--out DIR]

Runs W ranks (default: every visible GPU, at least 2), one per GPU. nvidia-smi samples
every GPU's SM clock, power draw and clock-event reasons every 20 ms in the background.
Each phase runs back-to-back calls on every rank for --seconds after a short warm-up; the
phase's window is the time between two barriers, and each sample inside it counts for
that phase. Printed per phase: µs per call (CUDA events over the whole window, max over
ranks), then per GPU the median SM clock (MHz), the median power (W) and the most
frequent clock-event reasons bitmask. The samples go to DIR/clock_samples.csv when --out
is given. With --tune each fused path runs once per value of the distfuse tuning key,
and with --rounds R the fused phases are repeated R times in turn (A B A B ...), so that
a drift of the board weighs on every value alike.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distfuse.bench.__main__ import _tune_item


def _smi_fields():
    """The query fields; drivers before the rename know the reasons as clocks_throttle_reasons."""
    for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={reasons}", "--format=csv,noheader"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return f"timestamp,index,clocks.sm,power.draw,{reasons}"
    raise SystemExit("nvidia-smi knows neither clocks_event_reasons nor clocks_throttle_reasons: "
                     + probe.stdout + probe.stderr)


def _phases(args, rank, group_name):
    """(name, call) for each phase; every call reads inputs made here (random, not zeros)."""
    import distfuse
    dev = torch.device("cuda", rank)
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    a = torch.randn(args.m, args.k, device=dev, dtype=torch.bfloat16, generator=g) * args.k ** -0.5
    w = torch.randn(args.n, args.k, device=dev, dtype=torch.bfloat16, generator=g)
    b = w.t()  # the nn.Linear weight view
    y = torch.randn(args.m, args.n, device=dev, dtype=torch.bfloat16, generator=g)

    def fused(path, knobs):
        def call():
            with distfuse.tuning(knobs), distfuse.force_path("matmul_all_reduce", path):
                distfuse.matmul_all_reduce(a, b, group_name)
        return call

    def mm_nccl():
        out = torch.matmul(a, b)
        dist.all_reduce(out)

    phases = [("cublas matmul", lambda: torch.matmul(a, b))]
    knobs = [{}]
    if args.tune:
        key, values = args.tune
        knobs = [{key: v} for v in values]
    phases += [(" ".join([f"fused {p}"] + [f"{k.split('.')[-1]}={v}" for k, v in kn.items()]), fused(p, kn))
               for _ in range(args.rounds) for p in args.paths.split(",") for kn in knobs]
    phases += [("matmul + NCCL", mm_nccl), ("distfuse all_reduce", lambda: distfuse.all_reduce(y, group_name)),
               ("cublas matmul (again)", lambda: torch.matmul(a, b))]
    return phases


def _worker(rank, args, init_file, queue):
    from distfuse.bench.__main__ import SAFE_ENV
    os.environ.update(SAFE_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=args.world_size,
                            device_id=torch.device("cuda", rank))
    group_name = dist.group.WORLD.group_name
    import distfuse
    # A rank that waits for a call its peers do not make fails within seconds, not a minute.
    distfuse.init_workspace(group_name, max_bytes=2 * args.m * args.n * 2, timeout_ms=15000)
    rows = []
    for name, call in _phases(args, rank, group_name):
        # Every rank makes the same number of calls (a fused call waits for the same call
        # on every peer): counts from the slowest rank's time per call.
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        t_probe = time.time()
        for _ in range(8):
            call()
        torch.cuda.synchronize()
        per_call = torch.tensor([(time.time() - t_probe) / 8], dtype=torch.float64, device="cuda")
        dist.all_reduce(per_call, op=dist.ReduceOp.MAX)
        batches = max(1, int(args.seconds / per_call.item()) // 8)
        for _ in range(max(8, int(0.3 / per_call.item()))):  # warm-up: clocks and power settle
            call()
        torch.cuda.synchronize()
        dist.barrier()
        start_ev, stop_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.time()
        start_ev.record()
        for _ in range(batches):
            for _ in range(8):
                call()
            torch.cuda.synchronize()  # keeps the host within a few calls of the GPU
        calls = 8 * batches
        stop_ev.record()
        torch.cuda.synchronize()
        t1 = time.time()
        dist.barrier()
        rows.append((name, t0, t1, start_ev.elapsed_time(stop_ev) * 1e3 / calls))
    queue.put((rank, rows))
    dist.destroy_process_group()


def _parse_samples(lines):
    samples = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((stamp, int(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
        except ValueError:
            continue
    return samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--paths", default="pair_exchange")
    ap.add_argument("--world-size", type=int, default=None, help="ranks, one per GPU (default: every GPU)")
    ap.add_argument("--tune", type=_tune_item, default=None,
                    help="KEY=V1,V2: each fused path once per value of a tuning key")
    ap.add_argument("--rounds", type=int, default=1, help="the fused phases this many times in turn")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.world_size is None:
        args.world_size = torch.cuda.device_count()
    if not 2 <= args.world_size <= torch.cuda.device_count():
        raise SystemExit(f"clock_probe needs 2 to {torch.cuda.device_count()} ranks (one per GPU), "
                         f"got --world-size {args.world_size}")
    world = args.world_size

    with tempfile.TemporaryDirectory() as tmp:
        smi_log = os.path.join(tmp, "smi.csv")
        with open(smi_log, "w") as log:
            smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={_smi_fields()}", "--format=csv,noheader,nounits",
                                    "-lms", "20"], stdout=log, stderr=subprocess.STDOUT)
        try:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(r, args, os.path.join(tmp, "rv"), queue)) for r in range(world)]
            for p in procs:
                p.start()
            results = dict(queue.get(timeout=600) for _ in procs)
            for p in procs:
                p.join(timeout=30)
                if p.exitcode != 0:
                    raise SystemExit(f"rank process exited with {p.exitcode}")
        finally:
            smi.terminate()
            smi.wait(timeout=10)
        with open(smi_log) as f:
            lines = f.read().splitlines()
    samples = _parse_samples(lines)
    if not samples:
        raise SystemExit("no nvidia-smi samples parsed; its output began: " + " | ".join(lines[:3]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "clock_samples.csv"), "w") as f:
            f.write("epoch_s,gpu,sm_mhz,power_w,event_reasons\n")
            f.writelines(f"{t:.3f},{i},{c:.0f},{w:.1f},{r}\n" for t, i, c, w, r in samples)

    print(f"{torch.cuda.get_device_name(0)} x {world}; M = {args.m}, K = {args.k}, N = {args.n}, bf16, B = weight.t(); "
          f"{args.seconds} s per phase")
    print(f"{'phase':40s} {'us/call':>9s} | "
          + " | ".join(f"{f'GPU{g} MHz':>8s} {'W':>6s} {'reasons':>18s}" for g in range(world)) + " | samples")
    for i, (name, t0, t1, _) in enumerate(results[0]):
        us = max(results[r][i][3] for r in range(world))
        cells = []
        count = 0
        for gpu in range(world):
            inside = [s for s in samples if s[1] == gpu and t0 <= s[0] <= t1]
            count = max(count, len(inside))
            if not inside:
                cells.append(f"{'-':>8s} {'-':>6s} {'-':>18s}")
                continue
            reasons = collections.Counter(s[4] for s in inside).most_common(1)[0][0]
            cells.append(f"{statistics.median(s[2] for s in inside):8.0f} "
                         f"{statistics.median(s[3] for s in inside):6.0f} {reasons:>18s}")
        print(f"{name:40s} {us:9.1f} | " + " | ".join(cells) + f" | {count}")


if __name__ == "__main__":
    main()
