"""Symmetric-memory workspaces, one per process group.

A workspace holds the peer-mapped buffers and flags the fused kernels use. It is
created collectively (every rank of the group must call) and must exist before
CUDA-graph capture; ops called outside capture create it on first use.
"""
from typing import Dict

import torch

from .ops import GroupLike, group_name

DEFAULT_MAX_BYTES = 16 << 20  # largest fused-GEMM output (M·N·element size) held without growing


def init_workspace(group: GroupLike = None, max_bytes: int = DEFAULT_MAX_BYTES,
                   timeout_ms: int = 0) -> bool:
    """Create (or re-create) the workspace of ``group`` on the current CUDA device.

    ``max_bytes`` sizes the tile region of the fused GEMM ops (the largest output
    M·N·element_size they handle without re-creating the workspace, which is not
    possible during CUDA-graph capture). ``timeout_ms`` bounds every wait inside
    the kernels (0: 60 s, or the DISTFUSE_TIMEOUT_MS environment variable).
    Returns True when the group has peer-to-peer access between all members (the
    fused paths can run), False when its ops take the NCCL/gloo path.
    Collective: every rank of the group must call it with the same arguments.
    """
    for name, value in (("max_bytes", max_bytes), ("timeout_ms", timeout_ms)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"distfuse.init_workspace: {name} must be an int >= 0, got {value!r}")
    name = group_name(group)  # a bad group fails here, also where the fused paths cannot run
    if not torch.cuda.is_available() or not torch.ops.distfuse._built_with_cuda():
        return False
    return bool(torch.ops.distfuse._init_workspace(name, max_bytes, timeout_ms))


def destroy_workspace(group: GroupLike = None) -> None:
    """Free the workspace of ``group`` (waits for the device first), with the buffers kept
    for CUDA graphs captured before: such graphs must not be replayed afterwards. Collective."""
    torch.ops.distfuse._destroy_workspace(group_name(group))


def workspace_info(group: GroupLike = None) -> Dict[str, int]:
    """Sizes of the workspace of ``group`` (empty when it has none), the SM count every
    rank sizes its persistent grids from (the smallest among the members), and
    ``retired_bytes``: buffers that growths or re-creations replaced and that are kept
    for CUDA graphs captured on them (until ``destroy_workspace``)."""
    values = torch.ops.distfuse._workspace_info(group_name(group))
    keys = ("p2p", "world", "rank", "total_bytes", "one_shot_capacity_bytes", "two_shot_bytes",
            "tile_bytes", "timeout_ms", "max_output_bytes", "ll128", "sm_count", "retired_bytes")
    return dict(zip(keys, values))
