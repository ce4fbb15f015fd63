"""GPU tests of matmul_all_reduce: every path against a float64 reference, the
overlapped schedules bitwise equal to the same kernels run one after the other,
bitwise identical across ranks, CUDA graphs and many calls of random M.
"""

import pytest
import torch

from dist_harness import assert_rank0_times_out, gpu_world_sizes, ranks_per_gpu, run_distributed

pytestmark = pytest.mark.multigpu

TILE_GEMM_PATHS = ("fused_tiles", "decode_push", "copy_engine", "band_pull", "pair_exchange",
                   "owner_exchange", "band_scatter")  # also row-major B
ALL_PATHS = ("fused_tiles", "decode_push", "decode_split_k", "copy_engine", "band_pull", "pair_exchange", "owner_exchange", "band_scatter",
             "serialized", "sequential", "chunked", "reference", "auto")
# Tuning that keeps auto off the pair exchange (so that it picks the band schedule).
NO_PAIR_EXCHANGE = {"matmul_all_reduce.pair_exchange_min_m": 1 << 40}


def _gather(t, world):
    import torch.distributed as dist
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def _poison_allocator(numel, dtype, dev):
    """Leave NaNs in the caching allocator so an unwritten output element shows."""
    torch.full((numel,), float("nan"), dtype=dtype, device=dev)


def _expected_path(path, m, n, world):
    """The owner schedule needs an output tile per rank; with fewer tiles (decode
    tiles are 64 x 128 for M <= 128) a forced fused_tiles runs the decode schedule.
    The pair exchange is for two ranks; forced elsewhere it runs the band schedule."""
    if path == "fused_tiles" and m <= 128 and -(-m // 64) * -(-n // 128) < world:
        return "decode_push"
    if path == "pair_exchange" and world != 2:
        return "band_pull"
    if path == "decode_split_k" and (m > 128 or n % 64 != 0):
        return "decode_push"
    return path


def _reference64(a, w, bias, world):
    """Σ_r a_r @ w_r.T (+ bias) in float64 from every rank's operands."""
    a_all = _gather(a, world)
    w_all = _gather(w, world)
    ref = sum(x.double() @ y.double().t() for x, y in zip(a_all, w_all))
    return ref + bias.double() if bias is not None else ref


def body_paths(rank, world, group_name):
    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    assert distfuse.init_workspace(group_name, max_bytes=32 << 20, timeout_ms=30000)
    torch.manual_seed(100 + rank)
    shapes = [(1, 512, 1024), (3, 1024, 8192), (8, 256, 264), (128, 2048, 8192), (1000, 512, 1024),
              (4097, 1024, 2048)]
    for dtype in (torch.bfloat16, torch.float16):
        for m, k, n in shapes:
            for with_bias in (False, True):
                a = torch.randn(m, k, dtype=dtype, device=dev)
                w = torch.randn(n, k, dtype=dtype, device=dev) / k ** 0.5  # nn.Linear weight [N, K]
                # The bias of a row-parallel layer is replicated: identical on every rank.
                bias_gen = torch.Generator(device="cpu").manual_seed(m * 7919 + n)
                bias = torch.randn(n, generator=bias_gen).to(dev, dtype) if with_bias else None
                ref = _reference64(a, w, bias, world)
                outs = {}
                for path in ALL_PATHS:
                    for layout in ("weight_t", "row_major"):
                        if layout == "row_major" and path not in TILE_GEMM_PATHS:
                            continue
                        b = w.t() if layout == "weight_t" else w.t().contiguous()
                        _poison_allocator(m * n, dtype, dev)
                        with force_path("matmul_all_reduce", path):
                            out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
                            taken = last_path("matmul_all_reduce")
                        assert path == "auto" or taken == _expected_path(path, m, n, world), (path, taken)
                        assert out.shape == (m, n) and out.dtype == dtype
                        assert not out.isnan().any(), (path, layout, m, k, n)
                        rel = ((out.double() - ref).norm() / ref.norm()).item()
                        assert rel < 1e-2, (dtype, path, layout, m, k, n, with_bias, rel)
                        outs[(path, layout)] = out
                # Same GEMM + same reduction order: the overlap changes no bit.
                assert torch.equal(outs[("auto", "weight_t")], outs[("serialized", "weight_t")]), (m, k, n)
                # Also for the SM-pull band schedule and (two ranks) the pair exchange, each
                # picked by auto with its thresholds lowered.
                lowered = {"band_pull": {"matmul_all_reduce.band_pull_min_m": 1,
                                         "matmul_all_reduce.band_pull_min_k": 8, **NO_PAIR_EXCHANGE},
                           "pair_exchange": {"matmul_all_reduce.pair_exchange_min_m": 1},
                           "owner_exchange": {"matmul_all_reduce.owner_exchange_min_m": 1, **NO_PAIR_EXCHANGE},
                           "band_scatter": {"matmul_all_reduce.band_scatter_min_m": 1,
                                            "matmul_all_reduce.band_pull_min_k": 8}}
                for path in ("band_pull", "owner_exchange", "band_scatter") + (("pair_exchange",) if world == 2 else ()):
                    with distfuse.tuning(lowered[path]):
                        by_auto = distfuse.matmul_all_reduce(a, w.t(), group_name, bias=bias)
                        assert last_path("matmul_all_reduce") == path
                        with force_path("matmul_all_reduce", "serialized"):
                            serialized = distfuse.matmul_all_reduce(a, w.t(), group_name, bias=bias)
                    assert torch.equal(by_auto, serialized), (path, m, k, n)
                    assert torch.equal(by_auto, outs[(path, "weight_t")]), (path, m, k, n)
                for path in ("fused_tiles", "decode_push", "decode_split_k", "copy_engine", "band_pull",
                             "pair_exchange", "owner_exchange", "band_scatter", "sequential", "chunked", "auto"):
                    for other in _gather(outs[(path, "weight_t")], world):
                        assert torch.equal(other, outs[(path, "weight_t")]), ("ranks differ", path)
    # Leading batch dims, a shape the fused GEMM cannot take (K % 8 != 0), device mismatch.
    a = torch.randn(2, 5, 64, dtype=torch.bfloat16, device=dev)
    w = torch.randn(96, 64, dtype=torch.bfloat16, device=dev)
    out = distfuse.matmul_all_reduce(a, w.t(), group_name)
    assert out.shape == (2, 5, 96)
    a_odd = torch.randn(7, 60, dtype=torch.bfloat16, device=dev)
    w_odd = torch.randn(40, 60, dtype=torch.bfloat16, device=dev)
    out = distfuse.matmul_all_reduce(a_odd, w_odd.t(), group_name)
    assert last_path("matmul_all_reduce") == "sequential"
    rel = ((out.double() - _reference64(a_odd, w_odd, None, world)).norm() / out.double().norm()).item()
    assert rel < 1e-2, rel
    try:
        distfuse.matmul_all_reduce(a_odd, w_odd.t().cpu(), group_name)
    except RuntimeError as e:
        assert "matmul_all_reduce" in str(e) and "device" in str(e), str(e)
    else:
        raise AssertionError("device mismatch did not raise")


# Where ranks share GPUs (the W = 8 runs on fewer GPUs) every wait on a peer may last a
# time slice of the shared GPU, so the long tests make fewer calls there; each still
# takes every path several times.
SHARED_GPU = ranks_per_gpu() > 1


def body_exact_random_m(rank, world, group_name):
    """1000 calls (180 where ranks share GPUs), random M, integer-valued fp16 operands:
    exact results every call."""
    import distfuse
    from distfuse.ops import force_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=64 << 20, timeout_ms=30000)
    g = torch.Generator(device="cpu").manual_seed(11)  # same sequence of shapes on every rank
    k, n = 128, 1024
    for i in range(180 if SHARED_GPU else 1000):
        m = int(torch.randint(1, 700, (1,), generator=g))
        path = ("auto", "fused_tiles", "decode_push", "chunked", "copy_engine", "band_pull", "pair_exchange",
                "owner_exchange", "band_scatter")[i % 9]
        gen = torch.Generator(device="cpu").manual_seed(1_000_000 + i)
        a_all = torch.randint(-1, 2, (world, m, k), generator=gen).to(dev, torch.float16)
        w_all = torch.randint(-1, 2, (world, n, k), generator=gen).to(dev, torch.float16)
        expected = torch.einsum("rmk,rnk->mn", a_all.double(), w_all.double()).to(torch.float16)
        with force_path("matmul_all_reduce", path):
            out = distfuse.matmul_all_reduce(a_all[rank], w_all[rank].t(), group_name)
        assert torch.equal(out, expected), (i, m, path)


def _integer_operands(rank, world, m, k, n, dtype, dev, seed, row_major, with_bias):
    """Integer-valued operands of every rank (the same on every rank for one seed):
    this rank's A and B (row-major or weight.t()), the bias, the partials and their
    exact float64 sum (+ bias)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a_all = torch.randint(-2, 3, (world, m, k), generator=gen).to(dev, dtype)
    w_all = torch.randint(-2, 3, (world, n, k), generator=gen).to(dev, dtype)
    bias = torch.randint(-3, 4, (n,), generator=gen).to(dev, dtype) if with_bias else None
    b = w_all[rank].t().contiguous() if row_major else w_all[rank].t()
    partials = torch.einsum("rmk,rnk->rmn", a_all.double(), w_all.double())
    exact = partials.sum(0) + (bias.double() if bias is not None else 0)
    return a_all[rank], b, bias, partials, exact


def _exact_and_bitwise(out, unfused, partials, exact, world, tag):
    """`out` equals the exact sum wherever fp16 / bf16 hold every partial and the sum
    (integers up to 2048 / 256), is bitwise the unfused order's result, and is the
    same on every rank."""
    limit = 2048 if out.dtype == torch.float16 else 256
    if max(partials.abs().max(), exact.abs().max()) <= limit:
        assert torch.equal(out.double(), exact), tag
    assert torch.equal(out, unfused), ("overlap changed bits", tag)
    for other in _gather(out, world):
        assert torch.equal(other, out), ("ranks differ", tag)


def _captured_call(group_name, path, m, k, n, dev):
    """A CUDA graph of one fp16 matmul_all_reduce (with bias) on `path`, captured after
    a warm-up call on a side stream; returns the graph and its tensors."""
    import distfuse
    from distfuse.ops import force_path
    a = torch.zeros(m, k, dtype=torch.float16, device=dev)
    w = torch.zeros(n, k, dtype=torch.float16, device=dev)
    bias = torch.zeros(n, dtype=torch.float16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), force_path("matmul_all_reduce", path):
        distfuse.matmul_all_reduce(a, w.t(), group_name, bias=bias)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with force_path("matmul_all_reduce", path), torch.cuda.graph(graph):
        y = distfuse.matmul_all_reduce(a, w.t(), group_name, bias=bias)
        a.fill_(3.0)  # the input is overwritten right after the op, inside the graph
    return graph, (a, w, bias, y)


def _replays_are_exact(graph, tensors, rank, world, replays, tag, seed=77):
    """Replays with fresh integer-valued inputs changed in place; exact every time."""
    a, w, bias, y = tensors
    (m, k), n = a.shape, w.shape[0]
    for replay in range(replays):
        gen = torch.Generator(device="cpu").manual_seed(seed + replay)
        a_all = torch.randint(-1, 2, (world, m, k), generator=gen).to(a.device, torch.float16)
        w_all = torch.randint(-1, 2, (world, n, k), generator=gen).to(a.device, torch.float16)
        b_vals = torch.randint(-3, 4, (n,), generator=gen).to(a.device, torch.float16)
        a.copy_(a_all[rank])
        w.copy_(w_all[rank])
        bias.copy_(b_vals)
        y.fill_(float("nan"))
        graph.replay()
        # float64 on the GPU: the same exact integers as on the CPU, without the minutes a
        # CPU shared by W ranks takes for them.
        expected = (torch.einsum("rmk,rnk->mn", a_all.double(), w_all.double()) + b_vals.double()).to(torch.float16)
        assert torch.equal(y, expected), (tag, replay)


def body_graphs(rank, world, group_name):
    import distfuse
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=64 << 20, timeout_ms=30000)
    k, n = 256, 2048
    for path, m in (("decode_push", 4), ("decode_split_k", 4), ("decode_split_k", 100), ("sequential", 8), ("sequential", 700), ("fused_tiles", 512),
                    ("chunked", 700), ("copy_engine", 1500),
                    ("copy_engine", 3), ("band_pull", 1500), ("band_pull", 3), ("pair_exchange", 1500),
                    ("pair_exchange", 3), ("owner_exchange", 1500), ("owner_exchange", 3), ("band_scatter", 1500),
                    ("band_scatter", 3), ("auto", 1), ("auto", 1024), ("auto", 2100)):
        graph, tensors = _captured_call(group_name, path, m, k, n, dev)
        _replays_are_exact(graph, tensors, rank, world, 4 if SHARED_GPU else 20, (path, m))


def _eager_calls(group_name, calls, dev):
    import distfuse
    from distfuse.ops import force_path
    for path, m in calls:
        a = torch.randn(m, 1024, dtype=torch.bfloat16, device=dev)
        w = torch.randn(4096, 1024, dtype=torch.bfloat16, device=dev)
        with force_path("matmul_all_reduce", path):
            distfuse.matmul_all_reduce(a, w.t(), group_name)


def body_graphs_survive_growth(rank, world, group_name):
    """Eager growths of the tile region and the split-K scratch free what they replace
    when no graph was captured on it. Graphs captured on a small workspace still replay
    correctly after later eager calls grew it (their buffers are kept: retired_bytes),
    after the allocator's cache was emptied, and after init_workspace re-created the
    workspace (a graph captured on the grown buffer too); destroy_workspace frees them."""
    import distfuse
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=1 << 20, timeout_ms=30000)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info(dev)
    # Tile regions of ~60, ~100, ~135 and ~170 MB at W = 2 (64 MB grains): three growths.
    _eager_calls(group_name, (("band_pull", 1500), ("fused_tiles", 2500), ("band_pull", 3300),
                              ("fused_tiles", 4097)), dev)
    info = distfuse.workspace_info(group_name)
    assert info["max_output_bytes"] >= 4097 * 4096 * 2, info  # it grew
    assert info["retired_bytes"] == 0, info  # and kept nothing: no graph was captured
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info(dev)
    if not SHARED_GPU:  # the region now, not every size it passed (~380 MB more at W = 2)
        assert free_before - free_after < info["total_bytes"] + (64 << 20), (free_before, free_after, info)

    distfuse.destroy_workspace(group_name)
    distfuse.init_workspace(group_name, max_bytes=1 << 20, timeout_ms=30000)
    captured = [(path, m, _captured_call(group_name, path, m, 256, 1024, dev))
                for path, m in (("fused_tiles", 1000), ("band_pull", 1000), ("pair_exchange", 1000),
                                ("owner_exchange", 1000), ("band_scatter", 1000), ("sequential", 8), ("auto", 4),
                                ("decode_push", 4), ("decode_push", 40), ("decode_split_k", 40))]
    _eager_calls(group_name, (("band_pull", 4097), ("fused_tiles", 4097), ("copy_engine", 2000),
                              ("pair_exchange", 4097), ("owner_exchange", 4097), ("band_scatter", 4097)), dev)
    info = distfuse.workspace_info(group_name)
    assert info["max_output_bytes"] >= 4097 * 4096 * 2, info  # it grew
    assert info["retired_bytes"] > 0, info  # the captured graphs' buffers are kept
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    for path, m, (graph, tensors) in captured:
        _replays_are_exact(graph, tensors, rank, world, 5, (path, m, "after growth"))

    # A graph on the grown buffer, then a re-creation: every graph still replays.
    captured.append(("band_pull", 3000, _captured_call(group_name, "band_pull", 3000, 256, 1024, dev)))
    distfuse.init_workspace(group_name, max_bytes=2 << 20, timeout_ms=30000)
    assert distfuse.workspace_info(group_name)["retired_bytes"] > info["retired_bytes"]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    for path, m, (graph, tensors) in captured:
        _replays_are_exact(graph, tensors, rank, world, 3, (path, m, "after re-creation"))
    del captured
    distfuse.destroy_workspace(group_name)
    assert distfuse.workspace_info(group_name) == {}


def body_failed_growth(rank, world, group_name):
    """A growth of the tile region that one rank cannot allocate raises the same clear
    error on every rank, well before any timeout, and leaves every workspace as it was:
    calls that fit the old region still run and are right, and the same growth succeeds
    once the memory is back."""
    import time

    import torch.distributed as dist

    import distfuse
    from distfuse.ops import force_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=16 << 20, timeout_ms=30000)
    before = distfuse.workspace_info(group_name)

    def fused_call(m, k, n):
        a = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) / k ** 0.5
        _poison_allocator(m * n, torch.bfloat16, dev)
        with force_path("matmul_all_reduce", "fused_tiles"):
            out = distfuse.matmul_all_reduce(a, w.t(), group_name)
        ref = _reference64(a, w, None, world)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (m, k, n, rel)

    fused_call(1000, 256, 1024)
    # 256 MB of output: a tile region of (1 + 2 W) x 256 MB. The last rank leaves itself
    # 1 GB of free memory, less than that region.
    big = (16384, 64, 8192)
    hog = None
    if rank == world - 1:
        free, _ = torch.cuda.mem_get_info(dev)
        hog = torch.empty(free - (1 << 30), dtype=torch.uint8, device=dev)
    dist.barrier()
    start = time.monotonic()
    try:
        fused_call(*big)
    except RuntimeError as e:
        message = str(e).splitlines()[0]
    else:
        raise AssertionError("a growth the last rank cannot allocate did not raise")
    elapsed = time.monotonic() - start
    assert f"rank {world - 1}:" in message and "could not be allocated" in message, message
    assert f"group '{group_name}'" in message and "matmul_all_reduce" in message, message
    assert elapsed < 20, elapsed  # the store round, not the 30 s timeout of a rendezvous
    messages = [None] * world
    dist.all_gather_object(messages, message.split(" on rank ")[1])
    assert len(set(messages)) == 1, messages  # the same verdict on every rank
    assert distfuse.workspace_info(group_name) == before
    fused_call(1000, 256, 1024)  # the old region still serves what fits
    del hog
    torch.cuda.empty_cache()
    dist.barrier()
    fused_call(*big)
    assert distfuse.workspace_info(group_name)["max_output_bytes"] >= 16384 * 8192 * 2


def body_decode_variants(rank, world, group_name):
    """The decode schedule with LL lines, LL128 lines or flags, with one or several column blocks
    per CTA, back to back in mixed order: exact on integer inputs, the same bits as the
    unfused order, identical across ranks."""
    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=16 << 20, timeout_ms=30000)
    for i in range(60):
        m = (1, 2, 7, 16, 17, 64, 128, 129, 300)[i % 9]
        k = (8, 64, 520, 2048)[i % 4]
        n = (8, 264, 1024, 8192)[(i // 4) % 4]
        ll = (1, 2, 3)[i % 3] if m * n * 2 <= 256 << 10 else (2, 3)[i % 2]  # 3: LL128 lines where they fit
        ctas = (0, 1, 7, 40)[(i // 2) % 4]
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        a, b, bias, partials, exact = _integer_operands(rank, world, m, k, n, dtype, dev, 9000 + i,
                                                        row_major=i % 3 == 0, with_bias=i % 4 == 1)
        knobs = {"matmul_all_reduce.decode_ll": ll, "matmul_all_reduce.decode_ctas": ctas}
        with distfuse.tuning(knobs):
            _poison_allocator(m * n, dtype, dev)
            with force_path("matmul_all_reduce", "decode_push"):
                out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
                assert last_path("matmul_all_reduce") == "decode_push"
            with distfuse.tuning({"matmul_all_reduce.decode_max_m": 4096, "matmul_all_reduce.decode_min_m": 1}), \
                    force_path("matmul_all_reduce", "serialized"):
                unfused = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
        _exact_and_bitwise(out, unfused, partials, exact, world, (i, m, k, n, ll, ctas))


def _split_k_fits(m, k):
    """Whether the split-K decode schedule's token slice fits shared memory for some
    cluster of 1 to 8 CTAs (kernels/gemm/decode_split_k.cu, geometry_for)."""
    tile = 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128

    def k_blocks(c):  # 64-deep K blocks of a CTA's share of K (both rounded up)
        share = -(-k // c)
        return -(-share // 64)

    return any(tile * k_blocks(c) * 128 <= 128 << 10 for c in (1, 2, 4, 8))


def body_decode_split_k(rank, world, group_name):
    """The split-K decode schedule over token tiles of 8 to 128, clusters of 1 to 8 CTAs
    (K from 64 to 28672; where no cluster holds the token slice, the one-kernel decode
    schedule), one or many column blocks per cluster, with and without bias,
    back to back in mixed order: exact on integer inputs, the same bits as the unfused
    order, identical across ranks; shapes it does not take fall back to decode_push."""
    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=16 << 20, timeout_ms=30000)
    for i in range(48):
        m = (1, 3, 16, 17, 32, 63, 100, 128)[i % 8]
        k = (64, 520, 2048, 4096, 7168, 28672)[(i // 2) % 6]
        n = (64, 1024, 8192)[(i // 3) % 3]
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        a, b, bias, partials, exact = _integer_operands(rank, world, m, k, n, dtype, dev, 12000 + i,
                                                        row_major=False, with_bias=i % 3 == 1)
        _poison_allocator(m * n, dtype, dev)
        with force_path("matmul_all_reduce", "decode_split_k"):
            out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
            expected = "decode_split_k" if _split_k_fits(m, k) else "decode_push"
            assert last_path("matmul_all_reduce") == expected, (i, m, k, n)
        with distfuse.tuning({"matmul_all_reduce.decode_split_k_max_m": 4096}), \
                force_path("matmul_all_reduce", "serialized"):
            unfused = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
        _exact_and_bitwise(out, unfused, partials, exact, world, (i, m, k, n))
    # Shapes it does not take run the one-kernel decode schedule.
    for m, n in ((129, 1024), (8, 1000)):
        a, b, bias, partials, exact = _integer_operands(rank, world, m, 256, n, torch.float16, dev, 13000 + m,
                                                        row_major=False, with_bias=False)
        with force_path("matmul_all_reduce", "decode_split_k"):
            out = distfuse.matmul_all_reduce(a, b, group_name)
            assert last_path("matmul_all_reduce") == "decode_push", (m, n)
        assert torch.equal(out.double(), exact), (m, n)
    # The weights' layout is no part of the choice (ranks may differ in it): a row-major
    # [K, N] weight on even ranks, the transposed view on odd ones, split-K on all.
    a, b, bias, partials, exact = _integer_operands(rank, world, 8, 256, 1024, torch.float16, dev, 13500,
                                                    row_major=rank % 2 == 0, with_bias=True)
    with force_path("matmul_all_reduce", "decode_split_k"):
        out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
        assert last_path("matmul_all_reduce") == "decode_split_k"
    assert torch.equal(out.double(), exact)
    for other in _gather(out, world):
        assert torch.equal(other, out), "ranks differ"


def body_band_variants(rank, world, group_name):
    """The SM-pull band schedule as one persistent kernel (alone, or with its last 1 or 3
    bands in a second kernel of 2 to 40 CTAs or in the two-shot all-reduce after the GEMM;
    1 to 3 bands summed ahead of a gather; the GEMM's last wave as a band of its own or
    not; the GEMM's last waves split by K or whole; its tiles by M or ping-pong 128 x 128)
    and as one kernel per band, and every third call its owner-scatter form (the GEMM's
    exchange warps or its epilogue move each tile to its owner), with 1 to 40 CTAs and 1 to
    16 bands, back to back in mixed order (so the band sequences of the persistent kernels'
    flags and the tile slots run on across calls of different shapes, CTA, band and tail
    counts): exact on integer inputs,
    the same bits as the unfused order, identical across ranks; then CUDA graphs of six of
    these forms, replayed in turns."""
    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=64 << 20, timeout_ms=30000)
    lowered = {"matmul_all_reduce.band_pull_min_m": 1, "matmul_all_reduce.band_pull_min_k": 8, **NO_PAIR_EXCHANGE}
    for i in range(48):
        m = (1, 100, 129, 1000, 2500, 4097)[i % 6]
        k = (64, 520)[i % 2]
        n = (256, 1032, 4096)[(i // 2) % 3]
        knobs = {"matmul_all_reduce.band_persistent": (1, 2)[(i // 3) % 2],
                 "matmul_all_reduce.band_reduce_blocks": (1, 3, 16, 40)[(i // 4) % 4],
                 "matmul_all_reduce.bands": (1, 2, 8, 16)[(i // 5) % 4],
                 "matmul_all_reduce.band_tail": (1, 2, 4)[(i // 2) % 3],
                 "matmul_all_reduce.band_tail_blocks": (2, 16, 40)[(i // 7) % 3],
                 "matmul_all_reduce.band_tail_two_shot": (2, 1)[(i // 13) % 2],
                 "matmul_all_reduce.band_sum_ahead": (1, 2, 3)[(i // 11) % 3],
                 "matmul_all_reduce.band_last_wave": (1, 2)[(i // 6) % 2],
                 "matmul_all_reduce.band_whole_tiles": (1, 2)[(i // 9) % 2],
                 "matmul_all_reduce.band_tiles": (0, 4)[(i // 8) % 2], **lowered}
        path = "band_scatter" if i % 3 == 2 else "band_pull"
        if path == "band_scatter":
            knobs["matmul_all_reduce.band_scatter_min_m"] = 1
            knobs["matmul_all_reduce.band_scatter_by_warps"] = (1, 2)[(i // 3) % 2]
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        a, b, bias, partials, exact = _integer_operands(rank, world, m, k, n, dtype, dev, 7000 + i,
                                                        row_major=i % 7 == 0, with_bias=i % 4 == 1)
        with distfuse.tuning(knobs):
            _poison_allocator(m * n, dtype, dev)
            out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
            assert last_path("matmul_all_reduce") == path
            with force_path("matmul_all_reduce", "serialized"):
                unfused = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
        _exact_and_bitwise(out, unfused, partials, exact, world, (i, m, k, n, knobs))
    graphs = []
    for path, persistent, tail, two_shot, by_warps in (
            ("band_pull", 1, 1, 2, 1), ("band_pull", 2, 1, 2, 1), ("band_pull", 1, 3, 2, 1), ("band_pull", 1, 3, 1, 1),
            ("band_scatter", 1, 3, 1, 1), ("band_scatter", 1, 1, 2, 2)):
        knobs = {"matmul_all_reduce.band_persistent": persistent, "matmul_all_reduce.band_tail": tail,
                 "matmul_all_reduce.band_tail_two_shot": two_shot,
                 "matmul_all_reduce.band_scatter_by_warps": by_warps}
        with distfuse.tuning(knobs):
            graphs.append((path, knobs, _captured_call(group_name, path, 1500, 256, 2048, dev)))
    for turn in range(4):
        for path, knobs, (graph, tensors) in graphs:
            _replays_are_exact(graph, tensors, rank, world, 3, (path, knobs, turn), seed=1000 * turn)


def body_tile_exchanges_mixed(rank, world, group_name):
    """The pair exchange (two ranks) and the owner exchange between calls of the owner
    schedule and the band schedules (pulled and scattered) on the same workspace (they
    share its tile slots, flags and call epochs), with shapes that change every call,
    partial tiles (M, N not multiples of the tile), odd M, each tile shape, fewer CTAs
    than tiles, and the pair exchange's last tiles taken by the consumer warps or by the
    exchange warps: exact on integer inputs, the same bits as the unfused order, identical
    across ranks; then a CUDA graph of it replayed between eager calls of the others."""
    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=64 << 20, timeout_ms=30000)
    for i in range(45):
        path = ("pair_exchange", "owner_exchange", "fused_tiles", "owner_exchange", "band_pull",
                "pair_exchange", "band_scatter")[i % 7]
        m = (1, 3, 129, 1000, 2048, 4097, 300, 77, 2500)[i % 9]
        k = (64, 520, 1024)[i % 3]
        n = (8, 264, 1032, 4096, 2048)[(i // 2) % 5]
        if path == "fused_tiles" and -(-m // 128) * -(-n // 256) < world:
            path = "owner_exchange"
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        a, b, bias, partials, exact = _integer_operands(rank, world, m, k, n, dtype, dev, 5000 + i,
                                                        row_major=i % 4 == 0, with_bias=i % 3 == 1)
        # Tile shape (0 by M, 64x128, 128x128, 128x256, 128x128 ping-pong) and CTAs (0: one per SM).
        exchange = path.endswith("_exchange") and _expected_path(path, m, n, world) == path
        knobs = {"matmul_all_reduce.exchange_tiles": i % 5,
                 "matmul_all_reduce.exchange_ctas": (0, 7, 64)[i % 3],
                 "matmul_all_reduce.exchange_consumer_tail": (1, 2)[(i // 3) % 2]} if exchange else {}
        # What makes auto pick the same exchange (for "serialized").
        picked = {"pair_exchange": {"matmul_all_reduce.pair_exchange_min_m": 1},
                  "owner_exchange": {"matmul_all_reduce.owner_exchange_min_m": 1, **NO_PAIR_EXCHANGE}}.get(path, {})
        _poison_allocator(m * n, dtype, dev)
        with distfuse.tuning(knobs), force_path("matmul_all_reduce", path):
            out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
            assert last_path("matmul_all_reduce") == _expected_path(path, m, n, world), (path, m, n)
        with distfuse.tuning({**knobs, **picked} if exchange else {}), \
                force_path("matmul_all_reduce", "serialized" if exchange else path):
            unfused = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
        _exact_and_bitwise(out, unfused, partials, exact, world, (i, path, m, k, n, knobs))
    graphs = [(path, _captured_call(group_name, path, 2100, 256, 2056, dev))
              for path in ("pair_exchange", "owner_exchange")]
    for turn in range(4):
        for path, (graph, tensors) in graphs:
            _replays_are_exact(graph, tensors, rank, world, 3, (path, turn), seed=500 * turn)
        a, b, bias, partials, exact = _integer_operands(rank, world, 700, 256, 1024, torch.float16, dev, 77 + turn,
                                                        row_major=False, with_bias=False)
        with force_path("matmul_all_reduce", ("fused_tiles", "band_scatter", "pair_exchange", "owner_exchange")[turn]):
            out = distfuse.matmul_all_reduce(a, b, group_name)
        assert torch.equal(out.double(), exact), turn


def body_exchange_tiles_beyond_flags(rank, world, group_name):
    """A shape whose tile exchange would need more tile flags than the region holds
    (128 x 128 tiles at M = 512-1023, a very wide N): forced or chosen by the dispatch,
    the exchanges give way to the band schedule, and the result is exact."""
    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=1 << 20, timeout_ms=30000)
    m, k, n = 1000, 64, 140000  # 8 x 1094 tiles of 128 x 128, more than the 8192 flags
    a, b, _, _, exact = _integer_operands(rank, world, m, k, n, torch.float16, dev, 5, row_major=False,
                                          with_bias=False)
    for path in ("pair_exchange", "owner_exchange", "auto"):
        _poison_allocator(m * n, torch.float16, dev)
        with force_path("matmul_all_reduce", path):
            out = distfuse.matmul_all_reduce(a, b, group_name)
        assert torch.equal(out.double(), exact), path
        taken = last_path("matmul_all_reduce")
        assert taken not in ("pair_exchange", "owner_exchange"), (path, taken)
        if path != "auto":
            assert taken == "band_pull", (path, taken)


def body_side_streams_reused(rank, world, group_name):
    """Short-lived host threads, one after another on every rank, each run one call of a
    schedule that forks onto side streams (fused_tiles: stream 0; copy_engine: 0 and 1):
    every result is exact, and a thread takes the streams an ended thread handed back, so
    the process makes at most one stream per index instead of one per thread."""
    import threading

    import distfuse
    from distfuse.ops import force_path, last_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=16 << 20, timeout_ms=30000)
    made = torch.ops.distfuse._side_streams_made
    m, k, n = 256, 128, 1024
    a, b, _, _, exact = _integer_operands(rank, world, m, k, n, torch.float16, dev, 13, row_major=False,
                                          with_bias=False)
    failures = []

    def one_call(path):
        try:
            torch.cuda.set_device(dev)
            _poison_allocator(m * n, torch.float16, dev)
            with force_path("matmul_all_reduce", path):
                out = distfuse.matmul_all_reduce(a, b, group_name)
            assert last_path("matmul_all_reduce") == path, (path, last_path("matmul_all_reduce"))
            assert torch.equal(out.double(), exact), path
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            failures.append(f"{path}: {e!r}")

    threads = 24
    before = made()
    for i in range(threads):
        t = threading.Thread(target=one_call, args=(("fused_tiles", "copy_engine")[i % 2],))
        t.start()
        t.join(timeout=120)
        assert not t.is_alive(), f"thread {i} did not finish"
        assert not failures, failures
    assert made() - before <= 2, (made() - before, threads)


def body_exchange_missing_peer(rank, world, group_name, log_dir, path):
    """Rank 1 never makes the second call: rank 0's tile exchange or split-K decode
    schedule (kernels that may not print) must fail within the timeout with a message
    naming the op and the peer."""
    import distfuse
    from distfuse.ops import force_path
    dev = torch.device("cuda", torch.cuda.current_device())
    distfuse.init_workspace(group_name, max_bytes=16 << 20, timeout_ms=1500)
    a = torch.randn(32 if path == "decode_split_k" else 2048, 256, dtype=torch.bfloat16, device=dev)
    w = torch.randn(1024, 256, dtype=torch.bfloat16, device=dev)
    with force_path("matmul_all_reduce", path):
        distfuse.matmul_all_reduce(a, w.t(), group_name)
    torch.cuda.synchronize()

    def call():
        with force_path("matmul_all_reduce", path):
            distfuse.matmul_all_reduce(a, w.t(), group_name)
        torch.cuda.synchronize()

    assert_rank0_times_out(rank, call, log_dir, "matmul_all_reduce")


@pytest.mark.parametrize("path", ("pair_exchange", "owner_exchange", "decode_split_k"))
def test_exchange_missing_peer_times_out(tmp_path, path):
    run_distributed(body_exchange_missing_peer, 2, args=(str(tmp_path), path), backend="nccl", timeout=120)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_exchange_tiles_beyond_flags_fall_back(world):
    run_distributed(body_exchange_tiles_beyond_flags, world, backend="nccl", timeout=300)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_tile_exchanges_mixed_exact_and_bitwise(world):
    run_distributed(body_tile_exchanges_mixed, world, backend="nccl", timeout=300)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_band_variants_exact_and_bitwise(world):
    run_distributed(body_band_variants, world, backend="nccl", timeout=300)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_decode_split_k_exact_and_bitwise(world):
    run_distributed(body_decode_split_k, world, backend="nccl", timeout=300)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_decode_variants_exact_and_bitwise(world):
    run_distributed(body_decode_variants, world, backend="nccl", timeout=300)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_paths_against_reference_and_bitwise(world):
    run_distributed(body_paths, world, backend="nccl", timeout=600)


def test_thousand_calls_random_m_exact():
    run_distributed(body_exact_random_m, gpu_world_sizes()[-1], backend="nccl", timeout=600)


@pytest.mark.parametrize("world", gpu_world_sizes())
def test_graph_capture_replays(world):
    run_distributed(body_graphs, world, backend="nccl", timeout=300)


@pytest.mark.skipif(SHARED_GPU, reason="one rank must be alone on its GPU to run it out of memory")
def test_failed_growth_keeps_every_workspace():
    run_distributed(body_failed_growth, 2, backend="nccl", timeout=300)


def test_graphs_survive_workspace_growth():
    run_distributed(body_graphs_survive_growth, gpu_world_sizes()[-1], backend="nccl", timeout=300)


def test_side_streams_reused_across_threads():
    run_distributed(body_side_streams_reused, 2, backend="nccl", timeout=300)
