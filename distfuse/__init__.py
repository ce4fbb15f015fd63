"""distfuse: fused compute + communication operators for tensor-parallel PyTorch.

Importing the package loads the C++/CUDA library, which registers the ops in
``torch.ops.distfuse``; the typed wrappers live in :mod:`distfuse.ops`.
"""
import glob
import os

import torch

__version__ = "0.1.0"


def _load_library():
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not candidates:
        raise ImportError(
            f"distfuse: no compiled library (_C*.so) in {here}; build it with "
            "`pip install --no-build-isolation -e .`")
    torch.ops.load_library(candidates[0])
    return candidates[0]


_LIBRARY_PATH = _load_library()

from . import _autograd, _fake  # noqa: E402,F401  (register backward formulas and fake kernels)
from .comm import destroy_workspace, init_workspace, workspace_info  # noqa: E402
from .ops import (  # noqa: E402
    all_gather_matmul,
    all_reduce,
    all_reduce_rms_norm,
    attention_all_gather,
    check_calls,
    force_path,
    last_path,
    matmul_all_reduce,
    matmul_reduce_scatter,
    tuning,
)


def built_with_cuda() -> bool:
    """Whether the loaded library contains the fused CUDA kernels."""
    return bool(torch.ops.distfuse._built_with_cuda())


def build_id() -> str:
    """The source revision the loaded library was built from: a git commit, with "+dirty"
    when the tracked files differed from it, or "unknown"."""
    return str(torch.ops.distfuse._build_id())


__all__ = [
    "all_reduce", "matmul_all_reduce", "matmul_reduce_scatter", "all_gather_matmul",
    "attention_all_gather", "all_reduce_rms_norm", "init_workspace", "destroy_workspace",
    "workspace_info", "force_path", "last_path", "tuning", "check_calls", "built_with_cuda",
    "build_id",
]
