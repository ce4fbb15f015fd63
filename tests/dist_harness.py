"""Run a test body on W processes, one rank each, and report every rank's failure.

    def body(rank, world, group_name, arg1):   # module-level, so it can be pickled
        ...assertions...

    run_distributed(body, world=2, args=(arg1,))                 # CPU, gloo
    run_distributed(body, world=2, backend="nccl", args=(...))   # one GPU per rank
    run_distributed(body, world=8, backend="fake")               # rank 0 alone, torch's
                                                                 # fake group of 8

Each rank initialises torch.distributed (file:// rendezvous in a fresh temporary
directory), sets its CUDA device for nccl, imports distfuse, and calls
body(rank, world, group_name, *args). Exceptions are sent back with their
traceback; a rank that hangs past `timeout` s fails the test (no silent hang).

More ranks than GPUs (DISTFUSE_TEST_RANKS_PER_GPU = r > 1, e.g. W = 8 on 4 GPUs):
rank i runs on GPU i mod n, and the "nccl" tests run over gloo instead, since NCCL
refuses two ranks on one GPU; the ranks of a GPU take turns on it (time-sliced), so
this checks the W-rank code paths (flag layouts, rank loops, dispatch) for
correctness only; its times mean nothing.
"""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

# NVLink multicast stays off in every process (see DESIGN.md, machines).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def ranks_per_gpu() -> int:
    """DISTFUSE_TEST_RANKS_PER_GPU (default 1): how many ranks may share one GPU."""
    value = os.environ.get("DISTFUSE_TEST_RANKS_PER_GPU", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DISTFUSE_TEST_RANKS_PER_GPU must be a positive integer, got {value!r}")
    return int(value)


def gpu_rank_slots() -> int:
    """How many GPU ranks a test may start: the GPUs times ranks_per_gpu()."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n * ranks_per_gpu()


def _worker(rank, world, backend, init_file, body, args, queue, env):
    os.environ.update(SAFE_ENV)
    os.environ.update(env)
    import torch.distributed as dist
    try:
        if backend == "nccl":
            n_gpus = torch.cuda.device_count()
            torch.cuda.set_device(rank % n_gpus)
            if world > n_gpus:  # ranks share GPUs: NCCL refuses that, gloo does not
                os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
                dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
            else:
                dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                        device_id=torch.device("cuda", torch.cuda.current_device()))
        elif backend == "fake":  # torch's fake backend: one process, collectives do nothing
            from torch.testing._internal.distributed.fake_pg import FakeStore
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        else:
            dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                    world_size=world)
        import distfuse  # noqa: F401  (loads the ops)
        body(rank, world, dist.group.WORLD.group_name, *args)
        queue.put((rank, None))
    except BaseException:  # noqa: BLE001  (report everything to the parent)
        queue.put((rank, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def gpu_world_sizes() -> list:
    """World sizes the multi-GPU tests run at: 2, 4 and 8 where that many GPU rank
    slots exist (gpu_rank_slots(); [2] without GPUs, so that the parametrized ids
    stay stable), narrowed by DISTFUSE_TEST_WORLD_SIZES (e.g. "4") to split a test
    run across GPU subsets."""
    n = gpu_rank_slots()
    sizes = [w for w in (2, 4, 8) if w <= n] or [2]
    wanted = os.environ.get("DISTFUSE_TEST_WORLD_SIZES")
    if wanted:
        sizes = [w for w in sizes if str(w) in wanted.split()] or sizes[:1]
    return sizes


def run_distributed(body, world: int, args: tuple = (), backend: str = "gloo", timeout: float = 300,
                    env: dict | None = None) -> None:
    """Run body on `world` ranks; raise AssertionError naming every failed rank. A rank
    that dies without reporting (a crash) ends the wait for the others 10 s later, so
    that its peers, stuck in a collective with it, do not hold the test to `timeout`."""
    import queue as queue_mod
    import time
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ranks = [0] if backend == "fake" else list(range(world))
        procs = {r: ctx.Process(target=_worker,
                                args=(r, world, backend, init_file, body, args, queue, env or {}))
                 for r in ranks}
        for p in procs.values():
            p.start()
        results = {}
        deadline = time.monotonic() + timeout
        crash_seen = None  # when a rank was first seen dead without a report
        try:
            while len(results) < len(ranks) and time.monotonic() < deadline:
                try:
                    rank, err = queue.get(timeout=1)
                    results[rank] = err
                    continue
                except queue_mod.Empty:
                    pass
                if crash_seen is None and any(p.exitcode is not None and r not in results
                                              for r, p in procs.items()):
                    crash_seen = time.monotonic()
                if crash_seen is not None and time.monotonic() - crash_seen > 10:
                    break
        finally:
            for p in procs.values():
                p.join(timeout=10 if len(results) == len(ranks) else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    missing = [r for r in ranks if r not in results]
    failures = {r: e for r, e in results.items() if e is not None}
    if missing or failures:
        lines = []
        for r in missing:
            if crash_seen is not None and procs[r].exitcode not in (None, -9):
                lines.append(f"rank {r} died without reporting (crash, exit code {procs[r].exitcode})")
            else:
                lines.append(f"rank {r} did not finish ({'a peer crashed' if crash_seen is not None else f'hang past {timeout} s'})")
        lines += [f"rank {r} failed:\n{e}" for r, e in sorted(failures.items())]
        raise AssertionError("\n".join(lines))


def _run_capturing_device_stdout(call, log_path: str):
    """Runs call() with this process's stdout (where device printf goes) sent to
    log_path; returns (the RuntimeError's message or None, seconds taken, the log)."""
    import time
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(1)
    os.dup2(fd, 1)
    start = time.time()
    raised = None
    try:
        call()
    except RuntimeError as e:
        raised = str(e)
    finally:
        os.dup2(saved, 1)
        os.close(fd)
    elapsed = time.time() - start
    with open(log_path) as f:
        return raised, elapsed, f.read()


def assert_rank0_times_out(rank: int, call, log_dir: str, op: str):
    """After a barrier every rank but 0 returns; rank 0 runs call(), which waits on
    rank 1 forever unless the op's timeout fires. It must raise within 30 s, with
    the device's message naming the op and the peer. The trap leaves rank 0's CUDA
    context unusable; the harness reports the result before tearing down."""
    import torch.distributed as dist
    dist.barrier()
    if rank != 0:
        return
    raised, elapsed, text = _run_capturing_device_stdout(call, os.path.join(log_dir, "rank0_stdout.txt"))
    assert raised is not None, "a missing peer did not raise"
    assert elapsed < 30, elapsed
    assert f"distfuse: {op} timed out" in text and "peer rank 1" in text, text
