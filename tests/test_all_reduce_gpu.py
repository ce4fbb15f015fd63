"""GPU tests of the distfuse all-reduce (one-shot, two-shot, auto) against NCCL.

Run on a machine with >= 2 GPUs with P2P (skipped elsewhere). Each body runs on
every rank; results are compared exactly where inputs are integer-valued.
"""

import pytest
import torch

from dist_harness import assert_rank0_times_out, gpu_world_sizes, run_distributed

pytestmark = pytest.mark.multigpu

PATHS = ("one_shot", "two_shot", "two_shot_ll", "two_shot_ll128", "one_shot_ll128", "auto")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _int_inputs(numel, dtype, world, seed, device):
    """Every rank's input for one call (small integers: every sum is exact)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = torch.randint(-8, 9, (world, numel), generator=g).to(dtype)
    return xs.to(device)


def _capacity(path, world, ll128=True):
    """Bytes a forced path carries before it falls back to the two-shot (LL128 lines:
    17920 lines of 120 bytes per shard, twice that for the one-shot's whole input, none
    where the group does not allow them)."""
    return {"one_shot": 1 << 20, "two_shot_ll": world << 20,
            "two_shot_ll128": world * 17920 * 120 if ll128 else 0,
            "one_shot_ll128": 2 * 17920 * 120 if ll128 else 0}.get(path, 1 << 62)


def _gather(t, world):
    import torch.distributed as dist
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return out


def body_exact_and_bitwise(rank, world, group_name):
    import torch.distributed as dist
    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    assert distfuse.init_workspace(group_name, timeout_ms=20000), "P2P workspace expected"
    ll128 = bool(distfuse.workspace_info(group_name)["ll128"])
    print(f"rank {rank}: LL128 lines allowed: {ll128}")
    sizes = [1, 7, 8, 1000, 4097, 65536 + 3, 1000003, 4 << 20]
    seed = 0
    # The one-shot also in its second CTA geometry (two LL lines per thread).
    variants = [(path, {}) for path in PATHS] + [("one_shot", {"all_reduce.one_shot_lines_per_thread": 2})]
    for dtype in DTYPES:
        # The LL128 two-shot's region full, and one element more (then the two-shot).
        ll128_full = _capacity("two_shot_ll128", world) // torch.tensor([], dtype=dtype).element_size()
        for path, overrides in variants:
            for numel in sizes + [ll128_full, ll128_full + 1]:
                seed += 1
                xs = _int_inputs(numel, dtype, world, seed, dev)
                x = xs[rank].clone()
                expected = xs.to(torch.float64).sum(0).to(dtype)
                out = torch.full_like(x, float("nan"))  # poison: catches unwritten elements
                with force_path("all_reduce", path), distfuse.tuning(overrides):
                    out = distfuse.all_reduce(x, group_name)
                    taken = last_path("all_reduce")
                # A forced one-shot beyond its capacity (1 MB), or LL two-shot beyond
                # its own (W MB), runs the two-shot.
                want = "two_shot" if numel * x.element_size() > _capacity(path, world, ll128) else path
                assert path == "auto" or taken == want, (path, taken)
                if path == "auto" and world == 4 and ll128 and numel in (ll128_full, ll128_full + 1):
                    # W = 4 takes the LL128 two-shot up to its whole region.
                    assert taken == ("two_shot_ll128" if numel == ll128_full else "two_shot"), (numel, taken)
                assert torch.equal(out, expected), (dtype, path, numel, (out.double() - expected.double()).abs().max())
                assert torch.equal(x, xs[rank]), "input modified"
                for other in _gather(out, world):
                    assert torch.equal(other, out), "ranks disagree"
    # Random inputs: compare with NCCL within rounding, bitwise across ranks and paths.
    torch.manual_seed(1234 + rank)
    for dtype in (torch.bfloat16, torch.float16):
        for numel in (3, 12345, 300000, 2_000_001):
            x = torch.randn(numel, dtype=dtype, device=dev)
            ref64 = x.double().clone()
            dist.all_reduce(ref64)
            results = {}
            for path, lines in (("one_shot", 2), ("one_shot_fine", 1), ("two_shot", 2), ("two_shot_ll", 2),
                                ("two_shot_ll128", 2), ("one_shot_ll128", 2)):
                if numel * x.element_size() > _capacity(path.replace("_fine", ""), world, ll128):
                    continue
                with force_path("all_reduce", path.replace("_fine", "")), \
                        distfuse.tuning({"all_reduce.one_shot_lines_per_thread": lines}):
                    results[path] = distfuse.all_reduce(x, group_name)
            for path, out in results.items():
                rel = (out.double() - ref64).norm() / ref64.norm()
                assert rel < 5e-3, (dtype, numel, path, rel.item())
            vals = list(results.values())
            for other in vals[1:]:
                assert torch.equal(vals[0], other), "paths differ"
            for other in _gather(vals[0], world):
                assert torch.equal(other, vals[0]), "ranks disagree"
    # Odd layouts: non-contiguous and misaligned inputs, 2-D shapes, in-place semantics.
    base = torch.randint(-4, 5, (1001,), device=dev).to(torch.bfloat16)
    misaligned = base[1:]
    out = distfuse.all_reduce(misaligned, group_name)
    allin = _gather(misaligned.contiguous(), world)
    assert torch.equal(out, torch.stack(allin).double().sum(0).to(torch.bfloat16))
    mat = torch.randint(-4, 5, (64, 48), device=dev).to(torch.float16)
    out = distfuse.all_reduce(mat.t(), group_name)
    allin = _gather(mat.t().contiguous(), world)
    assert out.shape == (48, 64) and torch.equal(out, torch.stack(allin).double().sum(0).to(torch.float16))
    # Integer dtype: no fused kernel, the reference path still answers.
    ints = torch.arange(10, device=dev, dtype=torch.int32) * (rank + 1)
    assert torch.equal(distfuse.all_reduce(ints, group_name),
                       torch.arange(10, device=dev, dtype=torch.int32) * (world * (world + 1) // 2))


def body_graphs(rank, world, group_name):
    import distfuse
    from distfuse.ops import force_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, timeout_ms=20000)
    # Launched as programmatic dependents (PDL, 1) of the kernel before them, and not (2).
    cases = [(path, numel, dependent) for dependent in (2, 1)
             for path in ("one_shot", "two_shot", "two_shot_ll", "two_shot_ll128", "one_shot_ll128")
             for numel in (1000, 300001) if not (path == "one_shot" and numel * 2 > (1 << 20))]
    # LL128 blocks that walk several line chunks (more than 384 x 32 lines: the one-shot
    # at every W, the two-shot's shard at W = 2); the one-shot's input then fills both
    # halves of its slots.
    cases += [(path, 2_000_001, dependent) for dependent in (2, 1) for path in ("two_shot_ll128", "one_shot_ll128")]
    for path, numel, dependent in cases:
        with distfuse.tuning({"all_reduce.dependent_launch": dependent}):
            x = torch.zeros(numel, dtype=torch.bfloat16, device=dev)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), force_path("all_reduce", path):
                distfuse.all_reduce(x, group_name)  # warm-up outside capture
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with force_path("all_reduce", path), torch.cuda.graph(graph):
                x.add_(0)  # a kernel right before the op: the one a dependent launch overlaps
                y = distfuse.all_reduce(x, group_name)
                x.fill_(12345.0)  # overwrite the input right after the op, inside the graph
        for replay in range(50):
            xs = _int_inputs(numel, torch.bfloat16, world, 1000 + replay, dev)
            x.copy_(xs[rank])  # inputs changed in place between replays
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, xs.double().sum(0).to(torch.bfloat16)), (path, numel, dependent, replay)


def body_back_to_back(rank, world, group_name):
    """1000 calls of random sizes and paths, checked every time (stale flags, counters)."""
    import torch.distributed as dist
    import distfuse
    from distfuse.ops import force_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, timeout_ms=20000)
    second = dist.new_group(list(range(world)))  # a second group, used alternately
    distfuse.init_workspace(second, timeout_ms=20000)
    g = torch.Generator(device="cpu").manual_seed(7)  # same on every rank
    pending = []
    for i in range(1000):
        numel = int(torch.randint(1, 1 << int(torch.randint(1, 19, (1,), generator=g)), (1,), generator=g))
        path = PATHS[int(torch.randint(0, len(PATHS), (1,), generator=g))]
        group = group_name if i % 2 == 0 else second.group_name
        xs = _int_inputs(numel, torch.float16, world, 5000 + i, dev)
        # Both one-shot geometries interleaved (separate epochs and slots), the LL128
        # one-shot and two-shot (the same epochs and slots) and PDL launches.
        overrides = {"all_reduce.dependent_launch": 1 + i % 4 // 3, "all_reduce.one_shot_lines_per_thread": 1 + i % 3 // 2}
        with force_path("all_reduce", path), distfuse.tuning(overrides):
            out = distfuse.all_reduce(xs[rank], group)
        pending.append((out, xs))
        if len(pending) == 16:  # check in batches so that calls stay back to back
            for out, xs in pending:
                assert torch.equal(out, xs.double().sum(0).to(torch.float16)), i
            pending.clear()
    for out, xs in pending:
        assert torch.equal(out, xs.double().sum(0).to(torch.float16))


def body_reinit_and_streams(rank, world, group_name):
    import torch.distributed as dist

    import distfuse
    dev = torch.device("cuda", torch.cuda.current_device())
    for cycle in range(3):
        assert distfuse.init_workspace(group_name, max_bytes=(cycle + 1) << 20, timeout_ms=20000)
        info = distfuse.workspace_info(group_name)
        assert info["p2p"] == 1 and info["world"] == world and info["rank"] == rank
        sms = [None] * world  # the grids' SM count: the members' smallest, on every rank
        dist.all_gather_object(sms, torch.cuda.get_device_properties(dev).multi_processor_count)
        assert info["sm_count"] == min(sms), (info["sm_count"], sms)
        x = torch.full((5000,), float(rank + 1), device=dev)
        assert torch.equal(distfuse.all_reduce(x, group_name), torch.full_like(x, world * (world + 1) / 2))
        distfuse.destroy_workspace(group_name)
        assert distfuse.workspace_info(group_name) == {}
    # Lazy creation on first use, on a side stream.
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.full((777,), 2.0, device=dev, dtype=torch.bfloat16)
        y = distfuse.all_reduce(x, group_name)
    s.synchronize()
    assert torch.equal(y, torch.full_like(x, 2.0 * world))
    # Capture without a workspace big enough is a clear error, not a hang.
    distfuse.destroy_workspace(group_name)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            distfuse.all_reduce(x, group_name)
    except RuntimeError as e:
        assert "init_workspace" in str(e), str(e)
    else:
        raise AssertionError("capture without a workspace did not raise")


def body_missing_peer(rank, world, group_name, log_dir):
    """Rank 1 never calls: rank 0 must fail within the timeout with a message naming
    the op and the peer, instead of hanging."""
    import distfuse
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, timeout_ms=1500)
    x = torch.ones(4096, device=dev)
    distfuse.all_reduce(x, group_name)
    torch.cuda.synchronize()

    def call():
        distfuse.all_reduce(x, group_name)
        torch.cuda.synchronize()

    assert_rank0_times_out(rank, call, log_dir, "all_reduce")


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_exact_bitwise_and_nccl(world):
    run_distributed(body_exact_and_bitwise, world, backend="nccl", timeout=600)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_graph_capture_replays(world):
    run_distributed(body_graphs, world, backend="nccl", timeout=300)


def test_back_to_back_random_sizes_two_groups():
    run_distributed(body_back_to_back, gpu_world_sizes()[-1], backend="nccl", timeout=600)


def test_init_destroy_reinit_streams():
    run_distributed(body_reinit_and_streams, 2, backend="nccl", timeout=300)


def test_missing_peer_times_out(tmp_path):
    run_distributed(body_missing_peer, 2, args=(str(tmp_path),), backend="nccl", timeout=120)
