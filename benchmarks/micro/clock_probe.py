"""SM clocks and board power while a W = 2 row-parallel GEMM runs alone, fused with its
all-reduce, and followed by it: does the fused path's stretch of the GEMM come with a
lower SM clock (a power cap), or at the same clock (the memory system)?

    python3 benchmarks/micro/clock_probe.py [--m 8192] [--k 4096] [--n 8192] [--seconds 3]
                                            [--paths pair_exchange,band_pull] [--out DIR]

Needs 2 GPUs. nvidia-smi samples every GPU's SM clock, power draw and clock-event
reasons every 20 ms in the background. Each phase runs back-to-back calls on both ranks
for --seconds after a short warm-up; the phase's window is the time between two barriers,
and each sample inside it counts for that phase. Printed per phase: µs per call (CUDA
events over the whole window, max over ranks), then per GPU the median SM clock (MHz),
the median power (W) and the most frequent clock-event reasons bitmask. The samples go
to DIR/clock_samples.csv when --out is given.
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

    def fused(path):
        def call():
            with distfuse.force_path("matmul_all_reduce", path):
                distfuse.matmul_all_reduce(a, b, group_name)
        return call

    def mm_nccl():
        out = torch.matmul(a, b)
        dist.all_reduce(out)

    phases = [("cublas matmul", lambda: torch.matmul(a, b))]
    phases += [(f"fused {p}", fused(p)) for p in args.paths.split(",")]
    phases += [("matmul + NCCL", mm_nccl), ("distfuse all_reduce", lambda: distfuse.all_reduce(y, group_name)),
               ("cublas matmul (again)", lambda: torch.matmul(a, b))]
    return phases


def _worker(rank, args, init_file, queue):
    from distfuse.bench.__main__ import SAFE_ENV
    os.environ.update(SAFE_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    group_name = dist.group.WORLD.group_name
    rows = []
    for name, call in _phases(args, rank, group_name):
        warm_until = time.time() + 0.3
        while time.time() < warm_until:
            call()
        torch.cuda.synchronize()
        dist.barrier()
        start_ev, stop_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.time()
        start_ev.record()
        calls = 0
        while time.time() - t0 < args.seconds:
            for _ in range(8):
                call()
            calls += 8
            torch.cuda.synchronize()  # keeps the host within a few calls of the GPU
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
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"clock_probe needs 2 GPUs, found {torch.cuda.device_count()}")

    with tempfile.TemporaryDirectory() as tmp:
        smi_log = os.path.join(tmp, "smi.csv")
        with open(smi_log, "w") as log:
            smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={_smi_fields()}", "--format=csv,noheader,nounits",
                                    "-lms", "20"], stdout=log, stderr=subprocess.STDOUT)
        try:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(r, args, os.path.join(tmp, "rv"), queue)) for r in range(2)]
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

    print(f"{torch.cuda.get_device_name(0)} x 2; M = {args.m}, K = {args.k}, N = {args.n}, bf16, B = weight.t(); "
          f"{args.seconds} s per phase")
    print(f"{'phase':24s} {'us/call':>9s} | {'GPU0 MHz':>8s} {'W':>6s} {'reasons':>18s} | "
          f"{'GPU1 MHz':>8s} {'W':>6s} {'reasons':>18s} | samples")
    for i, (name, t0, t1, _) in enumerate(results[0]):
        us = max(results[r][i][3] for r in (0, 1))
        cells = []
        count = 0
        for gpu in (0, 1):
            inside = [s for s in samples if s[1] == gpu and t0 <= s[0] <= t1]
            count = max(count, len(inside))
            if not inside:
                cells.append(f"{'-':>8s} {'-':>6s} {'-':>18s}")
                continue
            reasons = collections.Counter(s[4] for s in inside).most_common(1)[0][0]
            cells.append(f"{statistics.median(s[2] for s in inside):8.0f} "
                         f"{statistics.median(s[3] for s in inside):6.0f} {reasons:>18s}")
        print(f"{name:24s} {us:9.1f} | {cells[0]} | {cells[1]} | {count}")


if __name__ == "__main__":
    main()
