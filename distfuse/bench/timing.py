"""Timing of one method (a callable) across the ranks of a process group.

A *method* is a callable ``fn(slot)`` that runs the measured operation once on
input set ``slot`` (0 <= slot < ``slots``) and returns its output tensor. All
three benchmarks (all_reduce, matmul_all_reduce, decoder_layer) describe their
columns as methods and time them with :class:`Timer`, so there is one timing
loop in the package.

How one sample is taken on CUDA (``Timer.run``)::

    torch.cuda.synchronize()              host and device idle, previous sample done
    prepare(slots)                        optional: refill inputs of in-place methods
    L2 flush                              read 256 MB (evicts inputs, writes back dirty lines)
    torch.cuda._sleep(host lead)          the host queues the next three lines meanwhile
    tiny all_reduce over the group        all ranks leave it at (nearly) the same time
    start.record(); run; end.record()     run = fn(slot) (eager) or graph.replay()

The host lead is at least ``host_lead_us`` and, after the warm-up samples, twice
the median host enqueue time seen, plus 20 µs (the same on every rank), so the start event
fires only once the whole sample is queued. The ranks meet after the sleep, so
a difference in clock speed between GPUs during the sleep does not skew them.
``run`` is one eager call, or the replay of a CUDA graph holding ``k`` back-to-back
calls on ``k`` different input sets (time per call = replay time / k), for
operations short enough that launch overhead would dominate. Because every call
of a replay reads a distinct input set and the L2 was flushed just before, no
input is served from L2. The device sleep lets the host run ahead, so eager
times are device times, not host launch times.

Each rank keeps the median of its samples; the reported time is the maximum
over ranks of these medians (a collective finishes when its slowest rank does).
``Timer.run_all`` takes the samples of a table row round the methods (sample i
of every column, then sample i + 1), so that a drift of the machine during the
row (clocks, temperature, power) weighs on every column alike.

On CPU (gloo, the reference run) the same loop uses ``time.perf_counter`` with
a ``dist.barrier`` before every sample, and no graphs or L2 flush.
"""
from __future__ import annotations

import gc
import itertools
import math
import random
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

FLUSH_BYTES = 256 << 20  # larger than the L2 of any GPU this runs on (50-60 MB on H100/H200)

# Ops whose calls run another op's kernels, so that --tune keys of that op apply to them
# too (the sequential and chunked matmul_all_reduce schedules end in the distfuse all-reduce).
TUNE_KEYS_ALSO_OF: Dict[str, Tuple[str, ...]] = {"matmul_all_reduce": ("all_reduce",)}


def tuned_method_name(path: str, overrides: Dict[str, int]) -> str:
    """Column name of a ``--tune`` variant, e.g. ``distfuse:fused_tiles[consumer_blocks=16]``."""
    return f"distfuse:{path}[" + ",".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(overrides.items())) + "]"


@dataclass
class TimingConfig:
    iters: int = 100            # timed samples per method (fewer when one sample is slow; see max_seconds)
    warmup: int = 10            # untimed samples first
    calls_per_graph: int = 10   # calls captured back to back in one CUDA graph
    flush_l2: bool = True       # read FLUSH_BYTES before every sample
    host_lead_us: float = 50.0  # least device sleep before the timed region (0: none); grows to
                                # cover the host time one call takes to enqueue (seen in warm-up)
    max_host_lead_us: float = 20000.0
    max_seconds: float = 3.0    # per method: cap on iters * sample time
    min_iters: int = 10         # never fewer timed samples than this
    interleave: bool = True     # run_all: samples go round the methods (see Timer.run_all)


@dataclass
class Method:
    """One column of a benchmark table.

    fn(slot) runs the op once on input set ``slot`` and returns its output.
    ``prepare(slots)`` runs before every sample, outside the timed region (e.g. to
    refill the inputs of an in-place op so that each sample reduces fresh data).
    ``info()`` is called after the correctness run and returns extra fields for
    the results row (e.g. the path the dispatcher took).
    """
    name: str
    fn: Callable[[int], Optional[torch.Tensor]]
    slots: int = 1
    prepare: Optional[Callable[[Sequence[int]], None]] = None
    info: Optional[Callable[[], Dict[str, Any]]] = None


@dataclass
class Timing:
    """Result of one method. ``us`` is None when the method could not run (``error`` says why)."""
    name: str
    us: Optional[float] = None
    error: Optional[str] = None
    # The correctness run's outputs, slot by slot: each of a graph's k back-to-back calls
    # (poisoned before the replay), or the one eager call on slot 0.
    outputs: List[torch.Tensor] = field(default_factory=list)
    samples: int = 0
    host_us: Optional[float] = None        # median host time to enqueue one sample (eager: launch cost)
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Optional[torch.Tensor]:
        """Slot 0's output of the correctness run."""
        return self.outputs[0] if self.outputs else None


@dataclass
class _Run:
    """A method being timed: its graph (if any), the agreed sample count and host lead,
    and the samples so far."""
    method: Method
    result: Timing
    k: int = 1                                # calls per timed region (graph replays: calls_per_graph)
    all_slots: List[int] = field(default_factory=list)
    graph: Any = None
    outs: List[Any] = field(default_factory=list)
    iters: int = 0
    lead_us: float = 0.0
    samples: List[float] = field(default_factory=list)
    host: List[float] = field(default_factory=list)

    def call(self, i: int) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.method.fn(i % len(self.all_slots))


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:240]


class Timer:
    """Times methods over the ranks of ``group`` (every rank must call with the same methods)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, config: Optional[TimingConfig] = None,
                 device: Optional[torch.device] = None):
        self.group = group if group is not None else dist.group.WORLD
        self.config = config or TimingConfig()
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        self.device = device
        self.cuda = device.type == "cuda"
        self._tiny = torch.zeros(1, device=device)  # values irrelevant: only the meeting point
        self._flush = None
        self._flush_out = None
        self._cycles_per_us = None
        if self.cuda:
            self._start_ev = torch.cuda.Event(enable_timing=True)  # around every timed region
            self._end_ev = torch.cuda.Event(enable_timing=True)
            if self.config.flush_l2:
                self._flush = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
                self._flush_out = torch.empty((), dtype=torch.float32, device=device)
            self._spin_up()  # first: the sleep is counted in SM clock cycles, calibrate at full clock
            if self.config.host_lead_us > 0:
                self._cycles_per_us = max(self._calibrate_sleep() for _ in range(3))

    # ---- collective helpers ----

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (a collective)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def max_over_ranks(self, values: Sequence[float]) -> List[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def sum_over_ranks(self, values: Sequence[float]) -> List[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    # ---- pieces of one sample ----

    def _calibrate_sleep(self) -> float:
        cycles = 2_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles // 10)  # wake the clock up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3
        return cycles / us if us > 0 else 1500.0

    def _spin_up(self, seconds: float = 0.3) -> None:
        """Keep the GPU busy for a moment so that the first method does not meet idle clocks."""
        x = torch.randn(4096, 4096, device=self.device, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(8):
                torch.matmul(x, x)
            torch.cuda.synchronize()
        del x

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _before_sample(self, prepare, slots, lead_us: float) -> None:
        """Between two samples: idle device, fresh inputs, cold L2, and a device sleep
        during which the host queues the alignment and the timed work."""
        if self.cuda:
            torch.cuda.synchronize()
            if prepare is not None:
                prepare(slots)
            if self._flush is not None:
                torch.sum(self._flush, dim=0, out=self._flush_out)
            if self._cycles_per_us and lead_us > 0:
                torch.cuda._sleep(int(lead_us * self._cycles_per_us))
        else:
            if prepare is not None:
                prepare(slots)

    def _align(self) -> None:
        """Ranks meet right before the timed region: on the device (a tiny all-reduce queued
        behind the sleep, so clock differences during the sleep do not skew the ranks),
        or on the host for CPU runs."""
        if self.cuda:
            dist.all_reduce(self._tiny, group=self.group)
        else:
            dist.barrier(group=self.group)

    # ---- the loop ----

    def run(self, method: Method, graph: bool = False, check: bool = True) -> Timing:
        """Time ``method`` (eager, or replays of a CUDA graph when ``graph``); with ``check``
        also return the slot-0 output of one run on freshly prepared inputs."""
        return self.run_all([method], graph=graph, check=check)[method.name]

    def run_all(self, methods: Sequence[Method], graph: bool = False, check: bool = True) -> Dict[str, Timing]:
        """Time every method. With ``config.interleave`` the timed samples go round the
        methods (sample i of every method, then sample i + 1), so that a slow drift of
        the machine (clocks, temperature, power) during the row weighs on every column
        alike, in an order shuffled for each round (the same on every rank), so that no
        column always follows the same one: where the GPUs are power-bound, a sample
        right after a long one runs at lower clocks (W = 2 down_proj M = 16384 in a fixed
        order: one path 4-7 % apart in two columns). Set-up, warm-up and the
        correctness run stay per method, in the given order."""
        out: Dict[str, Timing] = {}
        rounds = [list(methods)] if self.config.interleave else [[m] for m in methods]
        for together in rounds:
            runs = [self._set_up(m, graph) for m in together]
            live = [r for r in runs if r.result.error is None]  # the same on every rank (agreed)
            for r in live:
                self._warm_up(r)
            for i in range(max((r.iters for r in live), default=0)):
                for r in sample_order(live, i):
                    if i < r.iters:
                        self._sample(r, i)
            for r in runs:
                out[r.method.name] = self._finish(r, check)
        _free()
        return out

    def _set_up(self, method: Method, graph: bool) -> "_Run":
        """One eager call (and the capture) under try, then agree: a method that cannot
        run on some rank is skipped by every rank, so no rank waits in a collective alone."""
        graph = graph and self.cuda
        run = _Run(method, Timing(method.name))
        run.k = max(1, min(self.config.calls_per_graph, method.slots)) if graph else 1
        run.all_slots = list(range(max(1, method.slots)))
        error = None
        try:
            if method.prepare is not None:
                method.prepare(run.all_slots)
            method.fn(0)
            self._sync()
        except Exception as exc:  # noqa: BLE001  (recorded in the results)
            error = f"call failed: {_short_error(exc)}"
            _log_trace(method.name, exc)
        if not self.all_ok(error is None):
            run.result.error = error or "failed on another rank"
            return run
        if graph:
            try:
                run.graph, run.outs = self._capture(method, run.k)
            except Exception as exc:  # noqa: BLE001
                error = f"graph capture failed: {_short_error(exc)}"
                _log_trace(method.name, exc)
                run.graph, run.outs = None, []
            if not self.all_ok(error is None):
                run.result.error = error or "graph capture failed on another rank"
                run.graph, run.outs = None, []
                _free()
        if method.info is not None and run.result.error is None:
            # Now, while the method's own call (or capture) is the last one: with
            # interleaved samples other methods run before this one finishes, and a
            # graph replay records nothing.
            run.result.info = method.info() or {}
        return run

    def _warm_up(self, run: "_Run") -> None:
        """Untimed samples; then the number of timed samples (bounded in time, the same on
        every rank) and the device sleep before each (starts at host_lead_us and covers
        twice the typical host enqueue time seen here, the same value on every rank)."""
        cfg = self.config
        run.lead_us = cfg.host_lead_us if self._cycles_per_us else 0.0
        run.iters = cfg.iters
        if not cfg.warmup:
            return
        host_warm: List[float] = []
        t_begin = time.perf_counter()
        for i in range(cfg.warmup):
            _, h_us = self._timed_call(run, i)
            if i > 0:  # the first call may include one-time set-up
                host_warm.append(h_us)
        per = (time.perf_counter() - t_begin) / cfg.warmup
        want = max(cfg.min_iters, min(cfg.iters, int(cfg.max_seconds / max(per, 1e-9))))
        typical = statistics.median(host_warm) if host_warm else 0.0
        lead_want = min(cfg.max_host_lead_us, max(cfg.host_lead_us, 2.0 * typical + 20.0)) \
            if self._cycles_per_us else 0.0
        want, run.lead_us = self.max_over_ranks([want, lead_want])
        run.iters = int(want)

    def _sample(self, run: "_Run", i: int) -> None:
        us, h_us = self._timed_call(run, i)
        run.samples.append(us / run.k)
        run.host.append(h_us / run.k)

    def _timed_call(self, run: "_Run", i: int):
        """One sample (see the module docstring): device µs of the timed region and host
        µs to enqueue it."""
        slots = run.all_slots[:run.k] if run.graph is not None else [i % len(run.all_slots)]
        self._before_sample(run.method.prepare, slots, run.lead_us)
        if self.cuda:
            h0 = time.perf_counter()
            self._align()
            self._start_ev.record()
            run.call(i)
            self._end_ev.record()
            h_us = (time.perf_counter() - h0) * 1e6
            self._end_ev.synchronize()
            return self._start_ev.elapsed_time(self._end_ev) * 1e3, h_us
        self._align()
        t0 = time.perf_counter()
        run.call(i)
        us = (time.perf_counter() - t0) * 1e6
        return us, us

    def _finish(self, run: "_Run", check: bool) -> Timing:
        """Median and host cost over the ranks, then the correctness run on freshly
        prepared inputs (same code path as timed)."""
        result, method = run.result, run.method
        if result.error is not None:
            return result
        median = statistics.median(run.samples) if run.samples else float("nan")
        result.us = self.max_over_ranks([median])[0]
        result.samples = len(run.samples)
        result.host_us = statistics.median(run.host) if run.host else None
        if _VERBOSE and dist.get_rank(self.group) == 0:
            mode = "graph x%d" % run.k if run.graph is not None else "eager"
            print(f"    {method.name}: {result.us:.2f} us ({mode}, {len(run.samples)} samples, "
                  f"host {result.host_us or 0:.1f} us, lead {run.lead_us:.0f} us)", flush=True)
        if check:
            self._sync()
            if method.prepare is not None:
                method.prepare(run.all_slots[:run.k] if run.graph is not None else [0])
            if run.graph is not None:
                outs = [o for o in run.outs if isinstance(o, torch.Tensor)]
                # A call that leaves its output unwritten shows as NaN. Not where a prepare
                # step refilled the inputs: those methods reduce in place.
                for o in outs if method.prepare is None else ():
                    if o.is_floating_point():
                        o.fill_(float("nan"))
                run.graph.replay()
            else:
                out = method.fn(0)
                outs = [out] if isinstance(out, torch.Tensor) else []
            self._sync()
            result.outputs = [o.detach().clone() for o in outs]
        run.graph, run.outs = None, []  # frees the graph and its memory pool
        self._sync()
        return result

    def _capture(self, method: Method, k: int):
        """A CUDA graph of k back-to-back calls on slots 0..k-1, and their outputs."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for j in range(2):  # warm up on a side stream (library workspaces, NCCL setup)
                method.fn(j % max(1, method.slots))
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        dist.barrier(group=self.group)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            outs = [method.fn(j) for j in range(k)]
        torch.cuda.synchronize()
        return g, outs


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


_VERBOSE = False


def set_verbose(flag: bool) -> None:
    global _VERBOSE
    _VERBOSE = flag


def _log_trace(name: str, exc: BaseException) -> None:
    if _VERBOSE:
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"[rank {rank}] {name}:\n" + "".join(traceback.format_exception(exc)), flush=True)


def sample_order(items: Sequence, round_index: int) -> list:
    """The order of round ``round_index`` of interleaved samples: a shuffle seeded by the
    round alone, so every rank takes the same order (each sample meets the other ranks)."""
    order = list(items)
    random.Random(round_index).shuffle(order)
    return order


def slots_for_bytes(set_bytes: int, graph: bool, config: TimingConfig, budget_bytes: int = 4 << 30) -> int:
    """How many input sets to rotate through: 1 for eager (the L2 is flushed before
    every call); for a graph, one per captured call (``calls_per_graph``), fewer
    when they would not fit in ``budget_bytes``."""
    if not graph:
        return 1
    if set_bytes <= 0:
        return config.calls_per_graph
    return int(max(1, min(config.calls_per_graph, budget_bytes // set_bytes)))


def geomean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


# ---- what every benchmark module receives ----

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BenchContext:
    """The state one rank's benchmarks share: group, device, dtype, timer and options."""
    rank: int
    world: int
    group: dist.ProcessGroup
    group_name: str
    device: torch.device
    dtype: torch.dtype
    timer: Timer
    graph_mode: str = "auto"   # "auto" (per-op policy), "on" (graph rows only), "off" (eager only)
    quick: bool = False
    seed: int = 1234
    options: Dict[str, Any] = field(default_factory=dict)
    _symm: Any = None

    @property
    def cpu(self) -> bool:
        return self.device.type != "cuda"

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.group))

    def tune_path(self, default: str) -> str:
        """The path the ``--tune`` columns force (``--tune-path``, else ``default``)."""
        return self.options.get("tune_path") or default

    def tune_variants(self, op: str) -> List[Dict[str, int]]:
        """The combinations of ``--tune`` values whose keys belong to ``op``, or to an op it
        runs inside (matmul_all_reduce's all-reduce), none on CPU."""
        prefixes = tuple(p + "." for p in (op,) + TUNE_KEYS_ALSO_OF.get(op, ()))
        tune = {k: v for k, v in (self.options.get("tune") or {}).items() if k.startswith(prefixes)}
        if self.cpu or not tune:
            return []
        keys = sorted(tune)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(tune[k] for k in keys))]

    def graph_variants(self, small: bool, both_when_small: bool = False) -> List[bool]:
        """Which modes (False: eager, True: graph) to measure a row in. ``small``: the op
        is short enough for a graph under --graph auto; ``both_when_small``: measure
        such a row eager too."""
        if self.cpu or self.graph_mode == "off":
            return [False]
        if self.graph_mode == "on":
            return [True]
        if small:
            return [False, True] if both_when_small else [True]
        return [False]

    def generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF)
        return g

    def rand_int(self, shape, seed: int, bound: int = 16, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Random integers in [-bound, bound] (exact in every float dtype), never all zero."""
        t = torch.randint(-bound, bound + 1, tuple(shape), generator=self.generator(seed), device=self.device)
        return t.to(dtype or self.dtype)

    def randn(self, shape, seed: int, scale: float = 1.0, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = torch.randn(tuple(shape), generator=self.generator(seed), device=self.device, dtype=torch.float32)
        if scale != 1.0:
            t.mul_(scale)
        return t.to(dtype or self.dtype)

    def log(self, *msg) -> None:
        if self.rank == 0:
            print(*msg, flush=True)
