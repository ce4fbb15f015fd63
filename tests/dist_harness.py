"""Run a test body on W processes, one rank each, and report every rank's failure.

    def body(rank, world, group_name, arg1):   # module-level, so it can be pickled
        ...assertions...

    run_distributed(body, world=2, args=(arg1,))                 # CPU, gloo
    run_distributed(body, world=2, backend="nccl", args=(...))   # one GPU per rank

Each rank initialises torch.distributed (file:// rendezvous in a fresh temporary
directory), sets its CUDA device for nccl, imports distfuse, and calls
body(rank, world, group_name, *args). Exceptions are sent back with their
traceback; a rank that hangs past `timeout` s fails the test (no silent hang).
"""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

# NVLink multicast stays off in every process (see DESIGN.md, machines).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _worker(rank, world, backend, init_file, body, args, queue, env):
    os.environ.update(SAFE_ENV)
    os.environ.update(env)
    import torch.distributed as dist
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                                    world_size=world, device_id=torch.device("cuda", torch.cuda.current_device()))
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
    """World sizes the multi-GPU tests run at: 2, 4 and 8 where that many GPUs
    exist ([2] without GPUs, so that the parametrized ids stay stable), narrowed by
    DISTFUSE_TEST_WORLD_SIZES (e.g. "4") to split a test run across GPU subsets."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sizes = [w for w in (2, 4, 8) if w <= n] or [2]
    wanted = os.environ.get("DISTFUSE_TEST_WORLD_SIZES")
    if wanted:
        sizes = [w for w in sizes if str(w) in wanted.split()] or sizes[:1]
    return sizes


def run_distributed(body, world: int, args: tuple = (), backend: str = "gloo", timeout: float = 300,
                    env: dict | None = None) -> None:
    """Run body on `world` ranks; raise AssertionError naming every failed rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker,
                             args=(r, world, backend, init_file, body, args, queue, env or {}))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        import queue as queue_mod
        try:
            for _ in range(world):
                rank, err = queue.get(timeout=timeout)
                results[rank] = err
        except queue_mod.Empty:
            pass
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    missing = [r for r in range(world) if r not in results]
    failures = {r: e for r, e in results.items() if e is not None}
    if missing or failures:
        lines = [f"rank {r} did not finish within {timeout} s (hang or crash, exit code "
                 f"{procs[r].exitcode})" for r in missing]
        lines += [f"rank {r} failed:\n{e}" for r, e in sorted(failures.items())]
        raise AssertionError("\n".join(lines))


def run_capturing_device_stdout(call, log_path: str):
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
