"""Typed wrappers of the ``torch.ops.distfuse`` operators.

Every collective takes ``group``: a ``torch.distributed.ProcessGroup`` or its
``group_name`` string (``None`` means the default group). Sum is the only
reduction; results are bitwise identical on every rank.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist

GroupLike = Union[str, dist.ProcessGroup, None]

OPS = ("all_reduce", "matmul_all_reduce", "matmul_reduce_scatter", "all_gather_matmul",
       "attention_all_gather", "all_reduce_rms_norm")

# Paths the dispatcher can be forced to take, per op ("auto" lets it decide).
PATHS = {
    "all_reduce": ("auto", "reference", "one_shot", "two_shot", "two_shot_ll", "two_shot_ll128", "one_shot_ll128"),
    "matmul_all_reduce": ("auto", "reference", "sequential", "fused_tiles", "decode_push", "decode_split_k", "serialized",
                          "chunked", "copy_engine", "band_pull", "pair_exchange", "owner_exchange",
                          "band_scatter"),
}

# Entries of the dispatch table (csrc/include/distfuse/tuning.h) that can be overridden.
TUNING_KEYS = (
    "all_reduce.one_shot_max_bytes",       # largest one-shot all-reduce
    "all_reduce.two_shot_blocks",          # CTAs of the two-shot kernel
    "all_reduce.two_shot_chunk_bytes",     # bytes a two-shot CTA moves per peer and step
    "all_reduce.dependent_launch",         # programmatic dependent launch (PDL): 1 on, 2 off
    "all_reduce.one_shot_lines_per_thread",  # one-shot CTA geometry: 1 or 2 LL lines per thread
    "all_reduce.two_shot_ll_max_bytes",    # largest all-reduce on the LL two-shot (0: none)
    "all_reduce.two_shot_ll128_max_bytes",  # largest all-reduce on the LL128 two-shot (NVLink Hopper groups)
    "all_reduce.one_shot_ll128_max_bytes",  # largest all-reduce on the LL128 one-shot (NVLink Hopper groups)
    "matmul_all_reduce.fused_min_m",       # smallest M that takes the overlapped schedule
    "matmul_all_reduce.consumer_blocks",   # consumer CTAs beside the tile GEMM
    "matmul_all_reduce.group_tiles",       # owner schedule: tiles per round of flag releases
    "matmul_all_reduce.chunks",            # chunked schedule: row chunks
    "matmul_all_reduce.chunk_ar_blocks",   # chunked schedule: CTAs of each chunk's all-reduce
    "matmul_all_reduce.sequential_side_stream",  # sequential, graph-captured: all-reduce on a side stream: 1 on, 2 off
    "matmul_all_reduce.band_pull_min_m",   # smallest M that takes the SM-pull band schedule
    "matmul_all_reduce.band_pull_min_k",   # ... with at least this K per rank
    "matmul_all_reduce.bands",             # band schedules: bands per call (about)
    "matmul_all_reduce.band_reduce_blocks",  # band schedules: CTAs of each band's sum
    "matmul_all_reduce.band_persistent",   # SM-pull band schedule in one persistent kernel: 1 on, 2 off
    "matmul_all_reduce.band_tail",         # ... its last N - 1 bands in a second kernel after the GEMM (1: none)
    "matmul_all_reduce.band_tail_blocks",  # ... CTAs of that second kernel
    "matmul_all_reduce.band_last_wave",    # ... the GEMM's last wave as a band of its own: 1 on, 2 off
    "matmul_all_reduce.band_tail_two_shot",  # ... or those bands by the two-shot all-reduce (1 on, 2 off)
    "matmul_all_reduce.band_sum_ahead",    # ... bands a CTA may sum before it gathers the oldest
    "matmul_all_reduce.band_whole_tiles",  # band schedules: the GEMM's tiles whole, no stream-K: 1 on, 2 off
    "matmul_all_reduce.band_tiles",        # band schedules: the GEMM's output tile, as exchange_tiles (0: by M)
    "matmul_all_reduce.decode_max_m",      # largest M that takes the one-kernel decode schedule
    "matmul_all_reduce.decode_min_m",      # ... and the smallest
    "matmul_all_reduce.decode_split_k_max_m",  # largest M that takes the split-K decode schedule
    "matmul_all_reduce.decode_ll",         # decode schedule: push on LL lines 1, flags 2, LL128 lines 3
    "matmul_all_reduce.decode_ctas",       # decode schedule: CTAs (0: one per SM)
    "matmul_all_reduce.pair_exchange_min_m",  # smallest M that takes the pair exchange (W = 2)
    "matmul_all_reduce.owner_exchange_min_m",  # smallest M that takes the owner exchange
    "matmul_all_reduce.band_scatter_min_m",  # smallest M that takes the owner-scatter band schedule
    "matmul_all_reduce.band_scatter_by_warps",  # owner scatter by the GEMM's exchange warps 1, its TMA stores 2
    "matmul_all_reduce.exchange_tiles",    # both exchanges: output tile 1 64x128, 2 128x128, 3 128x256,
                                           # 4 128x128 in ping-pong (0: by M)
    "matmul_all_reduce.exchange_ctas",     # both exchanges: CTAs (0: whole waves, at most one per SM)
    "matmul_all_reduce.exchange_consumer_tail",  # pair exchange: consumers exchange each CTA's last tile: 1 on, 2 off
)


# Whether each call first checks that every rank of its group makes the same call
# (check_calls); DISTFUSE_CHECK_CALLS=1 turns it on for the whole process.
_call_checks = os.environ.get("DISTFUSE_CHECK_CALLS", "0") not in ("", "0")


def group_name(group: GroupLike) -> str:
    """The registered name of ``group`` (a ProcessGroup, a name, or None for WORLD)."""
    if isinstance(group, str):
        return group
    if group is None:
        group = dist.group.WORLD
    if group is None:
        raise ValueError("distfuse: no process group given and torch.distributed is not initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"distfuse: group must be a torch.distributed ProcessGroup, its group_name or None, "
                        f"got {type(group).__name__} {group!r}")
    return group.group_name


def _autocast(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """Inside torch.autocast, the matmul ops' floating operands in the autocast dtype, as
    torch.matmul and F.linear get them (fp32 weights with bf16 activations, say)."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')} {value.device.type}"
    return repr(value)


def _check_same_call(op: str, group: GroupLike, **arguments) -> None:
    """Raises ValueError on every rank of ``group`` unless all of them call ``op`` with the
    same shapes, dtypes, devices and other arguments, the same forced path and the same
    dispatch overrides: the kernels of one call exchange data and flags laid out by these,
    so a rank that differs would read wrong bytes or wait for flags that never come."""
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return  # a host collective can run in neither; the call is checked when it runs eagerly
    from ._reference import resolve_group
    pg = resolve_group(group)
    call = ", ".join(f"{name} {_described(value)}" for name, value in arguments.items())
    forced = torch.ops.distfuse._forced_path(op)
    if forced and forced != "auto":
        call += f", forced path {forced}"
    # Every override: a fused op may run the all-reduce's kernels too.
    values = {key: torch.ops.distfuse._get_tuning(key) for key in TUNING_KEYS}
    overrides = [f"{key}={value}" for key, value in values.items() if value != 0]
    if overrides:
        call += f", tuning {' '.join(overrides)}"
    calls = [None] * dist.get_world_size(pg)
    dist.all_gather_object(calls, call, group=pg)
    if len(set(calls)) > 1:
        each = "; ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
        raise ValueError(f"distfuse.{op}: the ranks of group {group_name(group)!r} did not make the same call: {each}")


@contextlib.contextmanager
def check_calls(enabled: bool = True) -> Iterator[None]:
    """Within the block every op first checks that all ranks of its group make the same
    call (shapes, dtypes, devices, other arguments, forced path, dispatch overrides) and
    raises ValueError on every rank, naming each rank's call, when they do not. It costs
    a host collective per call, so it is for debugging; calls inside a CUDA graph capture
    or a torch.compile trace are not checked. ``DISTFUSE_CHECK_CALLS=1`` turns it on for
    the whole process. Without it, a mismatched call fails only by the kernels' timeouts,
    or not at all."""
    global _call_checks
    previous, _call_checks = _call_checks, enabled
    try:
        yield
    finally:
        _call_checks = previous


def all_reduce(x: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """Σ_r x_r over the group (a new tensor, contiguous, same shape and dtype)."""
    if _call_checks:
        _check_same_call("all_reduce", group, x=x)
    return torch.ops.distfuse.all_reduce(x, group_name(group))


def matmul_all_reduce(a: torch.Tensor, b: torch.Tensor, group: GroupLike = None, *,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_r a_r @ b_r (+ bias, added once): a [..., K_r], b [K_r, N] -> [..., N].

    ``b`` may be row-major or a transposed view such as ``linear.weight.t()``.
    ``bias`` is the layer's replicated bias and must hold the same values on every
    rank (each part of the output adds the copy of whichever rank reduces it).
    This is the row-parallel linear layer: each GEMM tile's all-reduce starts as
    soon as the tile is written. A 1-D ``a`` [K_r] gives [N], as with torch.matmul.
    Inside ``torch.autocast`` the operands are cast to the autocast dtype.
    """
    a, b, bias = _autocast(a, b, bias)
    if a.dim() == 1:
        return matmul_all_reduce(a.unsqueeze(0), b, group, bias=bias).squeeze(0)
    if _call_checks:
        _check_same_call("matmul_all_reduce", group, a=a, b=b, bias=bias)
    return torch.ops.distfuse.matmul_all_reduce(a, b, group_name(group), bias=bias)


def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """Rows [r·M/W, (r+1)·M/W) of Σ_r a_r @ b_r, where M = prod(a.shape[:-1]) -> [M/W, N].
    Inside ``torch.autocast`` the operands are cast to the autocast dtype."""
    a, b = _autocast(a, b)
    if _call_checks:
        _check_same_call("matmul_reduce_scatter", group, a=a, b=b)
    return torch.ops.distfuse.matmul_reduce_scatter(a, b, group_name(group))


def all_gather_matmul(a: torch.Tensor, b: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """concat_r(a_r) @ b: a [M/W, K] (this rank's rows), b [K, N_r] -> [M, N_r].
    Inside ``torch.autocast`` the operands are cast to the autocast dtype."""
    a, b = _autocast(a, b)
    if _call_checks:
        _check_same_call("all_gather_matmul", group, a=a, b=b)
    return torch.ops.distfuse.all_gather_matmul(a, b, group_name(group))


def attention_all_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: GroupLike = None,
                         *, is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Context-parallel attention: rank r holds tokens [r·S/W, (r+1)·S/W) of q, k and v
    ([B, H, S/W, D]); returns softmax(q Kᵀ·scale) V over the whole gathered sequence,
    causal in global positions when ``is_causal``; [B, Hq, S/W, D]."""
    if _call_checks:
        _check_same_call("attention_all_gather", group, q=q, k=k, v=v, is_causal=is_causal, scale=scale)
    return torch.ops.distfuse.attention_all_gather(q, k, v, group_name(group), is_causal=is_causal,
                                                   scale=scale)


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        group: GroupLike = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(Σ_r x_r + residual) · weight, Σ_r x_r + residual)."""
    if _call_checks:
        _check_same_call("all_reduce_rms_norm", group, x=x, residual=residual, weight=weight, eps=eps)
    return torch.ops.distfuse.all_reduce_rms_norm(x, residual, weight, eps, group_name(group))


@contextlib.contextmanager
def force_path(op: str, path: str) -> Iterator[None]:
    """Force the dispatcher of ``op`` onto ``path`` (tests and benchmarks), e.g.
    ``with force_path("all_reduce", "two_shot"): ...``. Every rank must force the same path."""
    if op not in PATHS:
        raise ValueError(f"distfuse.force_path: op must be one of {sorted(PATHS)}, got {op!r}")
    if path not in PATHS[op]:
        raise ValueError(f"distfuse.force_path: path for {op} must be one of {PATHS[op]}, got {path!r}")
    previous = torch.ops.distfuse._forced_path(op)
    torch.ops.distfuse._set_forced_path(op, path)
    try:
        yield
    finally:
        torch.ops.distfuse._set_forced_path(op, previous or "auto")


@contextlib.contextmanager
def tuning(overrides: Dict[str, int]) -> Iterator[None]:
    """Override entries of the dispatch table within the block (benchmarks and tuning
    sweeps), e.g. ``with tuning({"matmul_all_reduce.consumer_blocks": 16}): ...``; a value
    of 0 means the table's own. Every rank must use the same overrides."""
    for key, value in overrides.items():
        if key not in TUNING_KEYS:
            raise ValueError(f"distfuse.tuning: key must be one of {TUNING_KEYS}, got {key!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"distfuse.tuning: {key} must be an int >= 0, got {value!r}")
    previous = {key: int(torch.ops.distfuse._get_tuning(key)) for key in overrides}
    for key, value in overrides.items():
        torch.ops.distfuse._set_tuning(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            torch.ops.distfuse._set_tuning(key, value)


def last_path(op: str) -> str:
    """The path the last CUDA call of ``op`` in this process took ("" before the first call).
    Recorded by the ops that choose among paths, ``all_reduce`` and ``matmul_all_reduce``; the
    other ops and CPU tensors run one composition each and record nothing."""
    return torch.ops.distfuse._last_path(op)
