"""Fake (Meta) kernels: output shapes from input shapes and the group size, after the real
ops' checks of shapes, dtypes and devices (csrc/ops/validate.cpp, the same wording), so that
a bad call fails while tracing, and a meta operand beside real ones (these kernels are also
the ops' Meta kernels) fails instead of yielding an uninitialized tensor."""
import math

import torch
from torch.distributed.distributed_c10d import _get_group_size_by_name


def _check_divisible(op: str, what: str, value: int, world: int) -> None:
    torch._check(value % world == 0,
                 lambda: f"distfuse.{op}: {what} = {value} must be divisible by the group size {world}")


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_same_device_dtype(op: str, ref_name: str, ref, name: str, t) -> None:
    torch._check(t.device == ref.device,
                 lambda: f"distfuse.{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    torch._check(t.dtype == ref.dtype,
                 lambda: f"distfuse.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def _check_float(op: str, name: str, t) -> None:
    torch._check(t.dtype in _FLOAT_DTYPES,
                 lambda: f"distfuse.{op}: {name} must be bfloat16, float16, float32 or float64, got {t.dtype}")


def _check_matmul(op: str, a, b, bias=None) -> None:
    """check_matmul of csrc/ops/validate.cpp."""
    _check_float(op, "a", a)
    torch._check(a.dim() >= 2,
                 lambda: f"distfuse.{op}: a must have shape (..., M, K) with at least 2 dims, got {list(a.shape)}")
    torch._check(b.dim() == 2, lambda: f"distfuse.{op}: b must have shape (K, N), got {list(b.shape)}")
    _check_same_device_dtype(op, "a", a, "b", b)
    torch._check(b.shape[0] == a.shape[-1],
                 lambda: f"distfuse.{op}: b must have shape (K, N) with K = a.size(-1) = {a.shape[-1]}, "
                         f"got b of shape {list(b.shape)}")
    if bias is not None:
        _check_same_device_dtype(op, "a", a, "bias", bias)
        torch._check(bias.dim() == 1 and bias.shape[0] == b.shape[1],
                     lambda: f"distfuse.{op}: bias must have shape (N,) with N = b.size(1) = {b.shape[1]}, "
                             f"got {list(bias.shape)}")


def _check_attention(op: str, q, k, v, scale) -> None:
    """check_attention of csrc/ops/validate.cpp."""
    _check_float(op, "q", q)
    torch._check(q.dim() == 4, lambda: f"distfuse.{op}: q must have shape (B, Hq, S/W, D), got {list(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"distfuse.{op}: k must have shape (B, Hkv, S/W, D), got {list(k.shape)}")
    torch._check(v.shape == k.shape,
                 lambda: f"distfuse.{op}: v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    _check_same_device_dtype(op, "q", q, "k", k)
    _check_same_device_dtype(op, "q", q, "v", v)
    torch._check(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and k.shape[3] == q.shape[3],
                 lambda: f"distfuse.{op}: k must have shape (B, Hkv, S/W, D) = ({q.shape[0]}, Hkv, {q.shape[2]}, "
                         f"{q.shape[3]}) to match q, got {list(k.shape)}")
    torch._check(k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
                 lambda: f"distfuse.{op}: the number of key/value heads Hkv = {k.shape[1]} must divide the number "
                         f"of query heads Hq = {q.shape[1]}")
    if scale is not None:
        torch._check(scale > 0, lambda: f"distfuse.{op}: scale must be > 0, got {scale}")


def _check_rms_norm(op: str, x, residual, weight, eps) -> None:
    """check_rms_norm of csrc/ops/validate.cpp."""
    _check_float(op, "x", x)
    torch._check(x.dim() >= 1, lambda: f"distfuse.{op}: x must have shape (..., N), got {list(x.shape)}")
    torch._check(residual.shape == x.shape,
                 lambda: f"distfuse.{op}: residual must have the shape of x {list(x.shape)}, got "
                         f"{list(residual.shape)}")
    _check_same_device_dtype(op, "x", x, "residual", residual)
    _check_same_device_dtype(op, "x", x, "weight", weight)
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: f"distfuse.{op}: weight must have shape (N,) with N = x.size(-1) = {x.shape[-1]}, got "
                         f"{list(weight.shape)}")
    torch._check(eps > 0, lambda: f"distfuse.{op}: eps must be > 0, got {eps}")


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
    _check_attention("attention_all_gather", q, k, v, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("distfuse::all_reduce_rms_norm")
def _all_reduce_rms_norm_fake(x, residual, weight, eps, group_name):
    _check_rms_norm("all_reduce_rms_norm", x, residual, weight, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)
