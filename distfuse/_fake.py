"""Fake (Meta) kernels: output shapes from input shapes and the group size only."""
import math

import torch
from torch.distributed.distributed_c10d import _get_group_size_by_name


def _check_divisible(op: str, what: str, value: int, world: int) -> None:
    torch._check(value % world == 0,
                 lambda: f"distfuse.{op}: {what} = {value} must be divisible by the group size {world}")


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_matmul(op: str, a, b, bias=None) -> None:
    """The real ops' checks of a matmul's operands (csrc/ops/validate.cpp, same wording), so
    that a bad call fails while tracing, and a meta operand beside real ones fails here
    (these kernels are also the ops' Meta kernels) instead of yielding an empty tensor."""
    torch._check(a.dtype in _FLOAT_DTYPES,
                 lambda: f"distfuse.{op}: a must be bfloat16, float16, float32 or float64, got {a.dtype}")
    torch._check(a.dim() >= 2,
                 lambda: f"distfuse.{op}: a must have shape (..., M, K) with at least 2 dims, got {list(a.shape)}")
    torch._check(b.dim() == 2, lambda: f"distfuse.{op}: b must have shape (K, N), got {list(b.shape)}")
    for name, t in (("b", b), ("bias", bias)):
        if t is None:
            continue
        torch._check(t.device == a.device,
                     lambda: f"distfuse.{op}: {name} must be on the device of a ({a.device}), got {t.device}")
        torch._check(t.dtype == a.dtype,
                     lambda: f"distfuse.{op}: {name} must have the dtype of a ({a.dtype}), got {t.dtype}")
    torch._check(b.shape[0] == a.shape[-1],
                 lambda: f"distfuse.{op}: b must have shape (K, N) with K = a.size(-1) = {a.shape[-1]}, "
                         f"got b of shape {list(b.shape)}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == b.shape[1],
                     lambda: f"distfuse.{op}: bias must have shape (N,) with N = b.size(1) = {b.shape[1]}, "
                             f"got {list(bias.shape)}")


@torch.library.register_fake("distfuse::all_reduce")
def _all_reduce_fake(x, group_name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("distfuse::matmul_all_reduce")
def _matmul_all_reduce_fake(a, b, group_name, bias=None):
    _check_matmul("matmul_all_reduce", a, b, bias)
    return a.new_empty((*a.shape[:-1], b.shape[1]))


@torch.library.register_fake("distfuse::matmul_reduce_scatter")
def _matmul_reduce_scatter_fake(a, b, group_name):
    _check_matmul("matmul_reduce_scatter", a, b)
    world = _get_group_size_by_name(group_name)
    m = math.prod(a.shape[:-1])
    _check_divisible("matmul_reduce_scatter", "M (the product of a's leading dims)", m, world)
    return a.new_empty((m // world, b.shape[1]))


@torch.library.register_fake("distfuse::all_gather_matmul")
def _all_gather_matmul_fake(a, b, group_name):
    _check_matmul("all_gather_matmul", a, b)
    world = _get_group_size_by_name(group_name)
    return a.new_empty((math.prod(a.shape[:-1]) * world, b.shape[1]))


@torch.library.register_fake("distfuse::attention_all_gather")
def _attention_all_gather_fake(q, k, v, group_name, *, is_causal=False, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("distfuse::all_reduce_rms_norm")
def _all_reduce_rms_norm_fake(x, residual, weight, eps, group_name):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)
