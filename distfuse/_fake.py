"""Fake (Meta) kernels: output shapes from input shapes and the group size only."""
import math

import torch
from torch.distributed.distributed_c10d import _get_group_size_by_name


def _check_divisible(op: str, what: str, value: int, world: int) -> None:
    torch._check(value % world == 0,
                 lambda: f"distfuse.{op}: {what} = {value} must be divisible by the group size {world}")


@torch.library.register_fake("distfuse::all_reduce")
def _all_reduce_fake(x, group_name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("distfuse::matmul_all_reduce")
def _matmul_all_reduce_fake(a, b, group_name, bias=None):
    return a.new_empty((*a.shape[:-1], b.shape[1]))


@torch.library.register_fake("distfuse::matmul_reduce_scatter")
def _matmul_reduce_scatter_fake(a, b, group_name):
    world = _get_group_size_by_name(group_name)
    m = math.prod(a.shape[:-1])
    _check_divisible("matmul_reduce_scatter", "M (the product of a's leading dims)", m, world)
    return a.new_empty((m // world, b.shape[1]))


@torch.library.register_fake("distfuse::all_gather_matmul")
def _all_gather_matmul_fake(a, b, group_name):
    world = _get_group_size_by_name(group_name)
    return a.new_empty((math.prod(a.shape[:-1]) * world, b.shape[1]))


@torch.library.register_fake("distfuse::attention_all_gather")
def _attention_all_gather_fake(q, k, v, group_name, *, is_causal=False, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("distfuse::all_reduce_rms_norm")
def _all_reduce_rms_norm_fake(x, residual, weight, eps, group_name):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)
