"""The multi-process harness itself: a failing rank is named with its traceback, a rank
that dies without a report ends the test within seconds (its peers would otherwise
wait in a collective until the test's limit), and the ranks-per-GPU knob is checked."""
import os
import time

import pytest

from dist_harness import ranks_per_gpu, run_distributed


def _body_rank1_dies(rank, world, group_name):
    import torch.distributed as dist
    if rank == 1:
        os._exit(3)  # no report, as a crash leaves none
    dist.barrier()  # rank 0 waits here for a peer that is gone


def _body_rank0_fails(rank, world, group_name):
    assert rank != 0, "rank 0 refuses"


def test_dead_rank_is_reported_quickly():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_body_rank1_dies, 2, timeout=120)
    assert time.monotonic() - start < 60
    assert "rank 1 died without reporting (crash, exit code 3)" in str(info.value)


def test_failing_rank_is_named_with_its_traceback():
    with pytest.raises(AssertionError) as info:
        run_distributed(_body_rank0_fails, 2, timeout=120)
    assert "rank 0 failed" in str(info.value) and "rank 0 refuses" in str(info.value)
    assert "rank 1" not in str(info.value)


def test_ranks_per_gpu_knob(monkeypatch):
    monkeypatch.delenv("DISTFUSE_TEST_RANKS_PER_GPU", raising=False)
    assert ranks_per_gpu() == 1
    monkeypatch.setenv("DISTFUSE_TEST_RANKS_PER_GPU", "2")
    assert ranks_per_gpu() == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DISTFUSE_TEST_RANKS_PER_GPU", bad)
        with pytest.raises(ValueError, match="DISTFUSE_TEST_RANKS_PER_GPU"):
            ranks_per_gpu()
