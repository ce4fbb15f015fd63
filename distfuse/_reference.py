"""Reference compositions of the distfuse ops, written with plain torch.distributed.

These are the test oracle: each function composes ordinary PyTorch calls
(``torch.matmul``, ``dist.all_reduce`` on a clone, ``dist.all_gather_into_tensor``,
``dist.reduce_scatter_tensor``, ``F.scaled_dot_product_attention``) the way a
user would write the layer without distfuse. They do not call into the C++
library.

Every function takes ``precise``: when True, inputs are copied to CPU and
upcast to float64, the collectives run in float64 (``group`` must then handle
CPU tensors, e.g. a gloo group) and the float64 CPU result is returned, so a
bf16/fp16/fp32 result can be compared with a higher-precision answer. When
False, the computation runs on the inputs' device and dtype.

``group`` is a ``ProcessGroup``, its ``group_name`` string, or None (WORLD).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

GroupLike = Union[str, dist.ProcessGroup, None]

__all__ = ["all_reduce", "matmul_all_reduce", "matmul_reduce_scatter", "all_gather_matmul",
           "attention_all_gather", "all_reduce_rms_norm", "resolve_group"]


def resolve_group(group: GroupLike) -> dist.ProcessGroup:
    """The ProcessGroup named by ``group`` (a ProcessGroup, a group name, or None for WORLD)."""
    if group is None:
        if not dist.is_initialized():
            raise ValueError("distfuse._reference: torch.distributed is not initialized")
        return dist.group.WORLD
    if isinstance(group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group
        return _resolve_process_group(group)
    return group


def _prep(t: Optional[torch.Tensor], precise: bool) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.detach()
    if precise:
        return t.to(device="cpu", dtype=torch.float64)
    return t


def _sum(x: torch.Tensor, pg: dist.ProcessGroup) -> torch.Tensor:
    y = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=pg)
    return y


def _gloo_on_gpu(x: torch.Tensor, pg: dist.ProcessGroup) -> bool:
    """A gloo group given GPU tensors (ranks sharing GPUs): its all_gather_into_tensor
    crashes the process (SIGSEGV) on them in torch 2.11, so such gathers take host copies."""
    return x.device.type != "cpu" and dist.get_backend(pg) == "gloo"


def _gather_rows(x: torch.Tensor, pg: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank, in rank order."""
    if _gloo_on_gpu(x, pg):
        return _gather_rows(x.cpu(), pg).to(x.device)
    world = dist.get_world_size(pg)
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=pg)
    return out


def all_reduce(x: torch.Tensor, group: GroupLike = None, *, precise: bool = False) -> torch.Tensor:
    """Σ_r x_r."""
    return _sum(_prep(x, precise), resolve_group(group))


def matmul_all_reduce(a: torch.Tensor, b: torch.Tensor, group: GroupLike = None,
                      bias: Optional[torch.Tensor] = None, *, precise: bool = False) -> torch.Tensor:
    """Σ_r a_r @ b_r, plus ``bias`` once: a [..., K_r], b [K_r, N] -> [..., N]."""
    a, b, bias = _prep(a, precise), _prep(b, precise), _prep(bias, precise)
    y = _sum(torch.matmul(a, b), resolve_group(group))
    if bias is not None:
        y = y + bias
    return y


def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, group: GroupLike = None, *,
                          precise: bool = False) -> torch.Tensor:
    """Rows [r·M/W, (r+1)·M/W) of Σ_r a_r @ b_r, with M = prod(a.shape[:-1]) -> [M/W, N]."""
    a, b = _prep(a, precise), _prep(b, precise)
    pg = resolve_group(group)
    world = dist.get_world_size(pg)
    partial = torch.matmul(a.reshape(-1, a.shape[-1]), b).contiguous()
    m = partial.shape[0]
    if m % world:
        raise ValueError(f"matmul_reduce_scatter reference: M = {m} is not divisible by W = {world}")
    out = partial.new_empty((m // world, partial.shape[1]))
    dist.reduce_scatter_tensor(out, partial, op=dist.ReduceOp.SUM, group=pg)
    return out


def all_gather_matmul(a: torch.Tensor, b: torch.Tensor, group: GroupLike = None, *,
                      precise: bool = False) -> torch.Tensor:
    """concat_r(a_r) @ b: a [M/W, K] (leading dims flattened), b [K, N_r] -> [M, N_r]."""
    a, b = _prep(a, precise), _prep(b, precise)
    rows = _gather_rows(a.reshape(-1, a.shape[-1]), resolve_group(group))
    return torch.matmul(rows, b)


def attention_all_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: GroupLike = None,
                         is_causal: bool = False, scale: Optional[float] = None, *,
                         precise: bool = False) -> torch.Tensor:
    """Context-parallel attention: q [B, Hq, s, D], k/v [B, Hkv, s, D] hold tokens
    [r·s, (r+1)·s) of a sequence of length S = W·s. Returns softmax(q Kᵀ·scale) V over
    all S keys ([B, Hq, s, D]); with ``is_causal`` the query at global position r·s + i
    attends to keys at positions <= r·s + i. Query head h uses key/value head
    h // (Hq / Hkv)."""
    q, k, v = _prep(q, precise), _prep(k, precise), _prep(v, precise)
    pg = resolve_group(group)
    rank = dist.get_rank(pg)
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"attention_all_gather reference: Hkv = {hkv} does not divide Hq = {hq}")
    # Sequence-major so that rank order is sequence order: [s, B, H, D] -> [W*s, B, H, D].
    k_all = _gather_rows(k.permute(2, 0, 1, 3), pg).permute(1, 2, 0, 3)
    v_all = _gather_rows(v.permute(2, 0, 1, 3), pg).permute(1, 2, 0, 3)
    return local_attention(q, k_all, v_all, rank, is_causal, scale)


def local_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, rank: int, is_causal: bool,
                    scale: Optional[float]) -> torch.Tensor:
    """Attention of rank ``rank``'s queries q [B, Hq, s, D] over the gathered keys and values
    [B, Hkv, W·s, D]: query head h uses key/value head h // (Hq / Hkv); causal in global
    positions. Also the recomputation of the op's backward (distfuse/_autograd.py)."""
    hq, hkv, s = q.shape[1], k_all.shape[1], q.shape[2]
    if hq != hkv:
        k_all = k_all.repeat_interleave(hq // hkv, dim=1)
        v_all = v_all.repeat_interleave(hq // hkv, dim=1)
    mask = None
    if is_causal:
        q_pos = torch.arange(rank * s, (rank + 1) * s, device=q.device)[:, None]
        k_pos = torch.arange(k_all.shape[2], device=q.device)[None, :]
        mask = k_pos <= q_pos
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale)


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        group: GroupLike = None, *, precise: bool = False
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(y) · weight, y) with y = Σ_r x_r + residual, normalised over the last dim.
    Without ``precise`` the norm is computed in float32 (float64 for float64 inputs) and cast
    back to x's dtype."""
    x, residual, weight = _prep(x, precise), _prep(residual, precise), _prep(weight, precise)
    y = _sum(x, resolve_group(group)) + residual
    acc = y.to(torch.promote_types(y.dtype, torch.float32))
    normed = acc * torch.rsqrt(acc.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(acc.dtype)
    return normed.to(y.dtype), y
