"""Tensor-parallel linear layers.

A column-parallel layer splits the output features across the ranks of a
group (no communication in forward); a row-parallel layer splits the input
features and sums the partial products with ``distfuse.ops.matmul_all_reduce``,
whose all-reduce starts tile by tile while the GEMM is still running.

Rank, world size and group name are resolved once at construction, so that
``forward`` touches no Python-side ``torch.distributed`` API and traces into one
graph under ``torch.compile``.

Gradients follow tensor-parallel (Megatron) semantics: whatever is replicated
across the ranks (a column-parallel layer's input, a row-parallel layer's
reduced output, a gathered output) has a replicated gradient, equal to the
gradient of the unsharded layer; each rank's weight shard gets its slice of the
unsharded weight's gradient. The communication this needs runs in backward only
when autograd records the forward.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import GroupLike


def named_process_group(group: GroupLike) -> Tuple[str, dist.ProcessGroup]:
    """(group_name, ProcessGroup) of a ProcessGroup, a group name or None (WORLD)."""
    name = ops.group_name(group)
    pg = group if isinstance(group, dist.ProcessGroup) else \
        dist.distributed_c10d._resolve_process_group(name)
    return name, pg


def resolve_group(group: GroupLike) -> Tuple[str, int, int]:
    """(group_name, rank in the group, group size) of a ProcessGroup, a group name or None (WORLD)."""
    name, pg = named_process_group(group)
    return name, pg.rank(), pg.size()


def shard_size(what: str, value: int, world: int) -> int:
    """value // world, or a ValueError naming ``what`` when the split would not be even."""
    if value % world != 0:
        raise ValueError(f"distfuse.nn: {what} = {value} must be divisible by the group size {world}")
    return value // world


class _ReplicatedInput(torch.autograd.Function):
    """Identity in forward; in backward the sum over the ranks of the gradient.

    A replicated input feeds a different shard of the layer on every rank, so each
    rank's gradient holds only its shard's share; their sum is the input's gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = funcol.all_reduce(grad.contiguous(), "sum", ctx.group_name)
        return funcol.wait_tensor(summed), None


def _replicated_input(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    if world > 1 and torch.is_grad_enabled() and x.requires_grad:
        return _ReplicatedInput.apply(x, group_name)
    return x


def _gather_last_dim(y: torch.Tensor, group_name: str, rank: int, world: int) -> torch.Tensor:
    """[..., n] on every rank -> [..., W·n], rank r's block at [r·n, (r+1)·n).

    The gathered output is replicated, so its gradient is too: this rank's block of
    it is y's gradient (no communication in backward).
    """
    track = torch.is_grad_enabled() and y.requires_grad
    # A functional collective (traceable by Dynamo) gathers along dim 0: [W·d0, ..., n].
    # The regrouping to [..., W·n] is done here, as funcol's own path for another
    # gather dim is skipped by Dynamo (a graph break).
    g = funcol.all_gather_tensor((y.detach() if track else y).contiguous(), 0, group_name)
    full = g.unflatten(0, (world, -1)).movedim(0, -2).flatten(-2)
    if not track:
        return full
    n = y.shape[-1]
    return torch.cat([full[..., :rank * n], y, full[..., (rank + 1) * n:]], -1)


def _init_weight(weight: torch.Tensor, in_features: int) -> None:
    # nn.Linear's distribution, with the fan-in of the whole (unsharded) layer.
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def _check_same_shape(layer: nn.Module, linear: nn.Linear) -> None:
    theirs = (linear.in_features, linear.out_features, linear.bias is not None)
    ours = (layer.in_features, layer.out_features, layer.bias is not None)
    if theirs != ours:
        raise ValueError(f"distfuse.nn: cannot load an nn.Linear with (in_features, out_features, bias) = "
                         f"{theirs} into a {type(layer).__name__} with {ours}")


class _ShardedLinear(nn.Module):
    """What both tensor-parallel linear layers share: building one from a full layer."""

    @classmethod
    def from_unsharded(cls, linear: nn.Linear, group: GroupLike = None, **kwargs):
        """This rank's shard of a full ``nn.Linear`` (same dtype and device unless given in kwargs)."""
        kwargs.setdefault("dtype", linear.weight.dtype)
        kwargs.setdefault("device", linear.weight.device)
        layer = cls(linear.in_features, linear.out_features, group=group, bias=linear.bias is not None,
                    **kwargs)
        return layer.load_unsharded(linear)


class ColumnParallelLinear(_ShardedLinear):
    """y = x @ Wᵀ + b with the output features split across ranks.

    Rank r holds rows [r·out/W, (r+1)·out/W) of the weight ([out/W, in]) and the
    matching slice of the bias, and returns that slice of y (no communication),
    or the full y when ``gather_output`` (an all-gather along the last dim).
    """

    def __init__(self, in_features: int, out_features: int, group: GroupLike = None, bias: bool = True,
                 gather_output: bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        self._group_name, self.rank, self.world_size = resolve_group(group)
        self.in_features = in_features
        self.out_features = out_features
        self.out_features_per_rank = shard_size("out_features", out_features, self.world_size)
        self.gather_output = gather_output
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(self.out_features_per_rank, in_features, **factory))
        # Biases start at zero (as in Megatron-style TP layers): a random bias would
        # have to be drawn identically on every rank.
        self.bias = nn.Parameter(torch.zeros(self.out_features_per_rank, **factory)) if bias else None
        _init_weight(self.weight, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _replicated_input(x, self._group_name, self.world_size)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.world_size > 1:
            y = _gather_last_dim(y, self._group_name, self.rank, self.world_size)
        return y

    @torch.no_grad()
    def load_unsharded(self, linear: nn.Linear) -> "ColumnParallelLinear":
        """Copy this rank's rows of a full ``nn.Linear`` of the same shape into this layer."""
        _check_same_shape(self, linear)
        rows = slice(self.rank * self.out_features_per_rank, (self.rank + 1) * self.out_features_per_rank)
        self.weight.copy_(linear.weight[rows])
        if self.bias is not None:
            self.bias.copy_(linear.bias[rows])
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_features_per_rank} on rank {self.rank} of {self.world_size}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(_ShardedLinear):
    """y = x @ Wᵀ + b with the input features split across ranks.

    Rank r holds columns [r·in/W, (r+1)·in/W) of the weight ([out, in/W]) and the
    full bias. ``input_is_parallel``: x is already this rank's slice of the
    features (the output of a column-parallel layer); otherwise x is the full
    input and the layer takes its slice. ``reduce_results``: return the full y on
    every rank (one fused ``matmul_all_reduce``, bias added once); otherwise return
    this rank's partial product, with the bias on rank 0 only so that the sum of
    the partials contains it once (its gradient then reaches rank 0's bias only).

    ``fused=False`` computes the same thing the unfused way (``F.linear``, an
    in-place NCCL ``all_reduce``, then the bias): the baseline the benchmarks compare
    against. Gradients: the reduced output's gradient is replicated, so the weight,
    bias and (parallel) input gradients need no communication; a full input's
    gradient is summed over the ranks, each having filled its own slice.
    """

    def __init__(self, in_features: int, out_features: int, group: GroupLike = None, bias: bool = True,
                 input_is_parallel: bool = True, reduce_results: bool = True,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 fused: bool = True):
        super().__init__()
        # The unfused path's group is kept: torch.compile cannot trace the lookup by name.
        self._group_name, self._process_group = named_process_group(group)
        self.rank, self.world_size = self._process_group.rank(), self._process_group.size()
        self.fused = fused
        self.in_features = in_features
        self.out_features = out_features
        self.in_features_per_rank = shard_size("in_features", in_features, self.world_size)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank, **factory))
        # The bias is replicated and added after the reduction, so every rank must
        # hold the same values: start from zero rather than a per-rank random draw.
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        _init_weight(self.weight, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = _replicated_input(x, self._group_name, self.world_size)
            start = self.rank * self.in_features_per_rank
            x = x[..., start:start + self.in_features_per_rank]
        if not self.reduce_results:
            return F.linear(x, self.weight, self.bias if self.rank == 0 else None)
        if not self.fused:
            y = F.linear(x, self.weight)
            dist.all_reduce(y, group=self._process_group)
            # Added after the sum, on every rank: each rank's bias gets the same gradient.
            return y if self.bias is None else y + self.bias
        # weight.t() is a transposed view; the op takes it without a copy.
        return ops.matmul_all_reduce(x, self.weight.t(), self._group_name, bias=self.bias)

    @torch.no_grad()
    def load_unsharded(self, linear: nn.Linear) -> "RowParallelLinear":
        """Copy this rank's columns (and the whole bias) of a full ``nn.Linear`` of the same shape."""
        _check_same_shape(self, linear)
        cols = slice(self.rank * self.in_features_per_rank, (self.rank + 1) * self.in_features_per_rank)
        self.weight.copy_(linear.weight[:, cols])
        if self.bias is not None:
            self.bias.copy_(linear.bias)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_features_per_rank} on rank {self.rank} of "
                f"{self.world_size}), out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, reduce_results={self.reduce_results}")
