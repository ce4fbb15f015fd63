import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    from dist_harness import gpu_rank_slots
    n = gpu_count()
    slots = gpu_rank_slots()
    skip_gpu = pytest.mark.skip(reason="GPU test: no CUDA GPU on this machine")
    skip_multi = pytest.mark.skip(reason=f"multi-GPU test: needs >= 2 GPU rank slots (CUDA GPUs x "
                                         f"DISTFUSE_TEST_RANKS_PER_GPU), found {slots}")
    for item in items:
        if "gpu" in item.keywords and n == 0:
            item.add_marker(skip_gpu)
        elif "multigpu" in item.keywords and slots < 2:
            item.add_marker(skip_multi)
