"""Op tests on CPU over gloo: opcheck, results against the float64 oracle
(distfuse._reference), exact integer results, bitwise identity across ranks,
error messages, fake kernels and torch.compile.

Each test spawns its ranks once (tests/dist_harness.py) and runs many checks in
that one body, so the file stays fast on a small CI machine. The check helpers
take a device so tests/test_ops_gpu.py runs the same checks on CUDA.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_harness import run_distributed

# ‖out − ref‖ / ‖ref‖ allowed against the float64 oracle.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- helpers

def _pg(group_name):
    from distfuse._reference import resolve_group
    return resolve_group(group_name)


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖out − ref‖ / ‖scale‖ (scale defaults to ref); the absolute error if that norm is 0."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    denom = (ref if scale is None else scale.detach().to("cpu", torch.float64)).norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(what: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                 tol: float | None = None, scale: torch.Tensor | None = None) -> None:
    """‖out − ref‖ / ‖ref‖ <= tol[dtype]. For a plain cross-rank sum pass ``scale`` =
    Σ_r |x_r| (the oracle applied to |x|): the error is then measured against the
    size of the summands, which is what bounds the rounding of a sum computed in
    the output dtype, so a few-element sum that cancels does not fail spuriously."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the output"
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(out, ref, scale)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_exact(what: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """out (any float dtype) must equal the float64 reference value for value."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if not torch.equal(out64, ref64):
        bad = (out64 != ref64).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: not exact; first differing indices {bad}: "
                             f"{[out64[tuple(i)].item() for i in bad]} vs {[ref64[tuple(i)].item() for i in bad]}")


def assert_same_on_all_ranks(what: str, t: torch.Tensor, pg) -> None:
    """The bytes of t are identical on every rank of pg."""
    t = t.detach().to("cpu").contiguous()
    mine = (tuple(t.shape), str(t.dtype), t.reshape(-1).view(torch.uint8).clone())
    world = dist.get_world_size(pg)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=pg)
    for r, (shape, dt, bits) in enumerate(everyone):
        assert (shape, dt) == mine[:2], f"{what}: rank {r} has {shape} {dt}, this rank {mine[:2]}"
        if not torch.equal(bits, mine[2]):
            raise AssertionError(f"{what}: result of rank {r} differs bitwise from this rank's "
                                 f"({int((bits != mine[2]).sum())} bytes differ)")


class Inputs:
    """Random tensors for one check. ``local`` is seeded by rank (different on every
    rank); ``shared`` is the same on every rank (replicated inputs: bias, residual,
    weight). Tensors are created on CPU, then moved to ``device``."""

    def __init__(self, seed: int, rank: int, device):
        self.local = torch.Generator().manual_seed(seed * 1009 + rank)
        self.shared = torch.Generator().manual_seed(seed * 1009 + 997)
        self.device = torch.device(device)

    def randn(self, *shape, dtype=torch.float32, shared=False, scale=1.0, offset=0.0):
        g = self.shared if shared else self.local
        t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + offset
        return t.to(device=self.device, dtype=dtype)

    def ints(self, *shape, low=-2, high=2, dtype=torch.float32, shared=False):
        g = self.shared if shared else self.local
        t = torch.randint(low, high + 1, shape, generator=g, dtype=torch.int64)
        return t.to(device=self.device, dtype=dtype)


def _b_operand(inp: Inputs, k: int, n: int, dtype, transposed: bool, ints: bool = False):
    """b [K, N], row-major or as the transposed view of an [N, K] weight."""
    shape = (n, k) if transposed else (k, n)
    t = inp.ints(*shape, dtype=dtype) if ints else inp.randn(*shape, dtype=dtype)
    return t.t() if transposed else t


# ----------------------------------------------------------------------------- case lists

def matmul_ar_cases(world):
    """(a shape, N, b transposed, with bias, a non-contiguous) with K = a_shape[-1] per rank."""
    return [((1, 13), 11, False, False, False),
            ((3, 13), 29, False, True, False),
            ((1000, 13), 29, True, True, False),
            ((2, 3, 13), 11, False, False, False),
            ((2, 1, 5, 13), 19, True, True, False),
            ((3, 13), 11, False, False, True)]


def matmul_rs_cases(world):
    """(a shape, N, b transposed); M = prod(a_shape[:-1]) is divisible by the world size."""
    return [((world, 13), 11, False),
            ((3 * world, 13), 29, True),
            ((1000, 13), 29, False),
            ((world, 3, 13), 11, False),
            ((2, world, 5, 13), 19, True)]


def matmul_ag_cases(world):
    """(a shape on this rank, N_r, b transposed); K = a_shape[-1] is the full K."""
    return [((1, 21), 11, False),
            ((3, 21), 29, True),
            ((max(1, 1000 // world), 21), 29, False),
            ((2, 3, 21), 11, False)]


def attention_cases(world):
    """(B, Hq, Hkv, s per rank, D, causal, scale)."""
    cases = []
    for hkv in (1, 4):
        for s in (1, 5, 33):
            for causal in (False, True):
                cases.append((2 if s < 33 else 1, 4, hkv, s, 20, causal, None))
    cases.append((1, 4, 1, 7, 12, True, 0.37))
    cases.append((1, 4, 4, 3, 12, False, 0.37))
    # Hkv > 1 and < Hq pins the head mapping (query head h uses kv head h // (Hq/Hkv)).
    cases.append((2, 4, 2, 5, 20, True, None))
    cases.append((1, 6, 2, 3, 20, False, None))
    return cases


def all_reduce_shapes():
    return [(), (1,), (3,), (1000,), (3, 37), (2, 3, 13), (0, 5)]


def rms_cases():
    """(x shape, eps)."""
    return [((1, 37), 1e-6), ((3, 37), 1e-5), ((1000, 37), 1e-6), ((2, 5, 37), 1e-6), ((21,), 1e-5)]


# ----------------------------------------------------------------------------- checks

def check_random_vs_oracle(rank, world, group_name, device, dtypes, oracle_group, seed0=0):
    """Every op on random inputs of odd sizes against the float64 oracle; replicated
    outputs compared bitwise across ranks. Returns the number of checks."""
    import distfuse
    from distfuse import _reference as ref
    pg = _pg(oracle_group)  # bitwise comparisons go through the oracle's (CPU) group
    seed = seed0
    n_checks = 0
    for dtype in dtypes:
        tag = f"W={world} {dtype}"
        # all_reduce
        for shape in all_reduce_shapes():
            seed += 1
            inp = Inputs(seed, rank, device)
            x = inp.randn(*shape, dtype=dtype)
            out = distfuse.all_reduce(x, group_name)
            assert_close(f"all_reduce {shape} {tag}", out, ref.all_reduce(x, oracle_group, precise=True), dtype,
                         scale=ref.all_reduce(x.abs(), oracle_group, precise=True))
            assert_same_on_all_ranks(f"all_reduce {shape} {tag}", out, pg)
            n_checks += 1
        seed += 1
        inp = Inputs(seed, rank, device)
        x = inp.randn(13, 6, dtype=dtype).t()  # non-contiguous
        out = distfuse.all_reduce(x, _pg(group_name))  # the wrapper also takes a ProcessGroup
        assert_close(f"all_reduce transposed {tag}", out, ref.all_reduce(x, oracle_group, precise=True), dtype)

        # matmul_all_reduce
        for a_shape, n, bt, with_bias, noncontig in matmul_ar_cases(world):
            seed += 1
            inp = Inputs(seed, rank, device)
            k = a_shape[-1]
            if noncontig:
                a = inp.randn(*reversed(a_shape), dtype=dtype).t()
            else:
                a = inp.randn(*a_shape, dtype=dtype)
            b = _b_operand(inp, k, n, dtype, bt)
            bias = inp.randn(n, dtype=dtype, shared=True) if with_bias else None
            out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
            what = f"matmul_all_reduce a{a_shape} N={n} bT={bt} bias={with_bias} {tag}"
            assert_close(what, out, ref.matmul_all_reduce(a, b, oracle_group, bias, precise=True), dtype)
            assert_same_on_all_ranks(what, out, pg)
            n_checks += 1

        # matmul_reduce_scatter, all_gather_matmul
        for name, cases in (("matmul_reduce_scatter", matmul_rs_cases), ("all_gather_matmul", matmul_ag_cases)):
            for a_shape, n, bt in cases(world):
                seed += 1
                inp = Inputs(seed, rank, device)
                a = inp.randn(*a_shape, dtype=dtype)
                b = _b_operand(inp, a_shape[-1], n, dtype, bt)
                out = getattr(distfuse, name)(a, b, group_name)
                assert_close(f"{name} a{a_shape} N={n} bT={bt} {tag}", out,
                             getattr(ref, name)(a, b, oracle_group, precise=True), dtype)
                n_checks += 1

        # attention_all_gather
        for bsz, hq, hkv, s, d, causal, scale in attention_cases(world):
            seed += 1
            inp = Inputs(seed, rank, device)
            q = inp.randn(bsz, hq, s, d, dtype=dtype)
            k = inp.randn(bsz, hkv, s, d, dtype=dtype)
            v = inp.randn(bsz, hkv, s, d, dtype=dtype)
            out = distfuse.attention_all_gather(q, k, v, group_name, is_causal=causal, scale=scale)
            assert_close(f"attention_all_gather B={bsz} Hq={hq} Hkv={hkv} s={s} D={d} causal={causal} "
                         f"scale={scale} {tag}", out,
                         ref.attention_all_gather(q, k, v, oracle_group, causal, scale, precise=True), dtype)
            n_checks += 1

        # all_reduce_rms_norm
        for shape, eps in rms_cases():
            seed += 1
            inp = Inputs(seed, rank, device)
            x = inp.randn(*shape, dtype=dtype)
            residual = inp.randn(*shape, dtype=dtype, shared=True)
            weight = inp.randn(shape[-1], dtype=dtype, shared=True, scale=0.2, offset=1.0)
            normed, summed = distfuse.all_reduce_rms_norm(x, residual, weight, eps, group_name)
            ref_normed, ref_summed = ref.all_reduce_rms_norm(x, residual, weight, eps, oracle_group,
                                                             precise=True)
            what = f"all_reduce_rms_norm {shape} eps={eps} {tag}"
            magnitude = ref.all_reduce(x.abs(), oracle_group, precise=True) + residual.abs().cpu().double()
            assert_close(what + " (sum)", summed, ref_summed, dtype, scale=magnitude)
            assert_close(what + " (normed)", normed, ref_normed, dtype)
            assert_same_on_all_ranks(what + " (sum)", summed, pg)
            assert_same_on_all_ranks(what + " (normed)", normed, pg)
            n_checks += 1
    return n_checks


def check_integer_exact(rank, world, group_name, device, dtypes, oracle_group, seed0=5000):
    """Small-integer inputs: every partial and total sum is an integer of magnitude
    <= 4·7·W <= 256, exact in bf16/fp16/fp32, so results must equal the oracle exactly."""
    import distfuse
    from distfuse import _reference as ref
    assert world <= 8
    pg = _pg(oracle_group)  # bitwise comparisons go through the oracle's (CPU) group
    seed = seed0
    for dtype in dtypes:
        tag = f"W={world} {dtype} integer-valued"
        for shape in [(3, 37), (1000, 13), (1,)]:
            seed += 1
            x = Inputs(seed, rank, device).ints(*shape, low=-8, high=8, dtype=dtype)
            out = distfuse.all_reduce(x, group_name)
            assert_exact(f"all_reduce {shape} {tag}", out, ref.all_reduce(x, oracle_group, precise=True))
        for m in (1, 3, 1000):
            seed += 1
            inp = Inputs(seed, rank, device)
            a = inp.ints(m, 7, dtype=dtype)
            b = _b_operand(inp, 7, 13, dtype, transposed=(m == 3), ints=True)
            bias = inp.ints(13, dtype=dtype, shared=True)
            out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
            assert_exact(f"matmul_all_reduce M={m} {tag}", out,
                         ref.matmul_all_reduce(a, b, oracle_group, bias, precise=True))
            assert_same_on_all_ranks(f"matmul_all_reduce M={m} {tag}", out, pg)
        for m in (world, 3 * world, 1000):
            seed += 1
            inp = Inputs(seed, rank, device)
            a = inp.ints(m, 7, dtype=dtype)
            b = _b_operand(inp, 7, 13, dtype, transposed=False, ints=True)
            out = distfuse.matmul_reduce_scatter(a, b, group_name)
            assert_exact(f"matmul_reduce_scatter M={m} {tag}", out,
                         ref.matmul_reduce_scatter(a, b, oracle_group, precise=True))
        for m in (1, 3, 250):
            seed += 1
            inp = Inputs(seed, rank, device)
            a = inp.ints(m, 7, dtype=dtype)
            b = _b_operand(inp, 7, 13, dtype, transposed=False, ints=True)
            out = distfuse.all_gather_matmul(a, b, group_name)
            assert_exact(f"all_gather_matmul M/W={m} {tag}", out,
                         ref.all_gather_matmul(a, b, oracle_group, precise=True))
        for shape in [(3, 37), (1000, 13)]:
            seed += 1
            inp = Inputs(seed, rank, device)
            x = inp.ints(*shape, low=-8, high=8, dtype=dtype)
            residual = inp.ints(*shape, low=-8, high=8, dtype=dtype, shared=True)
            weight = inp.ints(shape[-1], low=1, high=3, dtype=dtype, shared=True)
            normed, summed = distfuse.all_reduce_rms_norm(x, residual, weight, 1e-6, group_name)
            ref_normed, ref_summed = ref.all_reduce_rms_norm(x, residual, weight, 1e-6, oracle_group,
                                                             precise=True)
            assert_exact(f"all_reduce_rms_norm {shape} (sum) {tag}", summed, ref_summed)
            assert_close(f"all_reduce_rms_norm {shape} (normed) {tag}", normed, ref_normed, dtype)
            assert_same_on_all_ranks(f"all_reduce_rms_norm {shape} (normed) {tag}", normed, pg)


def check_global_semantics(rank, world, group_name, device, dtype, oracle_group, seed0=9000):
    """Shard one global problem (the same on every rank) as DESIGN.md section 1 says and
    compare each op, and the oracle, with the unsharded float64 computation."""
    import distfuse
    from distfuse import _reference as ref
    g = torch.Generator().manual_seed(seed0 + world)

    def full(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def dev(t):
        return t.to(device=device, dtype=dtype)

    # all_reduce: rank r holds the r-th of W tensors.
    xs = full(world, 5, 7)
    assert_close("global all_reduce", distfuse.all_reduce(dev(xs[rank]), group_name), xs.sum(0), dtype)
    # matmul_all_reduce: A [M, W*K] and B [W*K, N] sharded along K.
    m, k, n = 6, 5, 9
    A, B, bias = full(m, world * k), full(world * k, n), full(n)
    a_r, b_r = A[:, rank * k:(rank + 1) * k], B[rank * k:(rank + 1) * k]
    expect = A @ B + bias
    assert_close("global matmul_all_reduce",
                 distfuse.matmul_all_reduce(dev(a_r), dev(b_r), group_name, bias=dev(bias)), expect, dtype)
    assert_close("global oracle matmul_all_reduce",
                 ref.matmul_all_reduce(a_r, b_r, oracle_group, bias, precise=True), expect, torch.float64)
    # matmul_reduce_scatter: same sharding, rank r gets rows [r*M/W, (r+1)*M/W).
    m = 2 * world
    A, B = full(m, world * k), full(world * k, n)
    a_r, b_r = A[:, rank * k:(rank + 1) * k], B[rank * k:(rank + 1) * k]
    expect = (A @ B)[rank * 2:(rank + 1) * 2]
    assert_close("global matmul_reduce_scatter",
                 distfuse.matmul_reduce_scatter(dev(a_r), dev(b_r), group_name), expect, dtype)
    assert_close("global oracle matmul_reduce_scatter",
                 ref.matmul_reduce_scatter(a_r, b_r, oracle_group, precise=True), expect, torch.float64)
    # all_gather_matmul: A [M, K] sharded by rows, B [K, W*N] sharded by columns.
    A, B = full(3 * world, k), full(k, world * n)
    a_r, b_r = A[rank * 3:(rank + 1) * 3], B[:, rank * n:(rank + 1) * n]
    expect = A @ b_r
    assert_close("global all_gather_matmul",
                 distfuse.all_gather_matmul(dev(a_r), dev(b_r), group_name), expect, dtype)
    assert_close("global oracle all_gather_matmul",
                 ref.all_gather_matmul(a_r, b_r, oracle_group, precise=True), expect, torch.float64)
    # attention_all_gather: the sequence split into W contiguous chunks.
    s = 3
    for hkv in (1, 2, 4):
        Q, K, V = full(2, 4, world * s, 8), full(2, hkv, world * s, 8), full(2, hkv, world * s, 8)
        sl = slice(rank * s, (rank + 1) * s)
        for causal in (False, True):
            expect = F.scaled_dot_product_attention(Q, K, V, is_causal=causal, enable_gqa=True)[:, :, sl]
            out = distfuse.attention_all_gather(dev(Q[:, :, sl]), dev(K[:, :, sl]), dev(V[:, :, sl]),
                                                group_name, is_causal=causal)
            assert_close(f"global attention_all_gather Hkv={hkv} causal={causal}", out, expect, dtype)
            assert_close(f"global oracle attention_all_gather Hkv={hkv} causal={causal}",
                         ref.attention_all_gather(Q[:, :, sl], K[:, :, sl], V[:, :, sl], oracle_group,
                                                  causal, precise=True), expect, torch.float64)
    # all_reduce_rms_norm
    xs, residual, weight = full(world, 4, 11), full(4, 11), full(11)
    y = xs.sum(0) + residual
    expect = F.rms_norm(y, (11,), weight, 1e-6)
    normed, summed = distfuse.all_reduce_rms_norm(dev(xs[rank]), dev(residual), dev(weight), 1e-6,
                                                  group_name)
    assert_close("global all_reduce_rms_norm (sum)", summed, y, dtype)
    assert_close("global all_reduce_rms_norm (normed)", normed, expect, dtype)
    r_normed, r_summed = ref.all_reduce_rms_norm(xs[rank], residual, weight, 1e-6, oracle_group, precise=True)
    assert_close("global oracle all_reduce_rms_norm", r_normed, expect, torch.float64)
    assert_close("global oracle all_reduce_rms_norm (sum)", r_summed, y, torch.float64)


def call_every_op_once(rank, world, group_name, device, dtype, oracle_group, seed=777):
    """One call of each op against the oracle (used for large world sizes)."""
    import distfuse
    from distfuse import _reference as ref
    pg = _pg(oracle_group)  # bitwise comparisons go through the oracle's (CPU) group
    inp = Inputs(seed, rank, device)
    x = inp.randn(3, 37, dtype=dtype)
    out = distfuse.all_reduce(x, group_name)
    assert_close("all_reduce", out, ref.all_reduce(x, oracle_group, precise=True), dtype,
                 scale=ref.all_reduce(x.abs(), oracle_group, precise=True))
    assert_same_on_all_ranks("all_reduce", out, pg)
    a, b, bias = inp.randn(2, 3, 13, dtype=dtype), inp.randn(13, 11, dtype=dtype), inp.randn(11, dtype=dtype, shared=True)
    out = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
    assert_close("matmul_all_reduce", out, ref.matmul_all_reduce(a, b, oracle_group, bias, precise=True), dtype)
    assert_same_on_all_ranks("matmul_all_reduce", out, pg)
    a = inp.randn(world, 3, 13, dtype=dtype)
    out = distfuse.matmul_reduce_scatter(a, b, group_name)
    assert_close("matmul_reduce_scatter", out, ref.matmul_reduce_scatter(a, b, oracle_group, precise=True), dtype)
    a, b2 = inp.randn(3, 21, dtype=dtype), inp.randn(21, 11, dtype=dtype)
    out = distfuse.all_gather_matmul(a, b2, group_name)
    assert_close("all_gather_matmul", out, ref.all_gather_matmul(a, b2, oracle_group, precise=True), dtype)
    for hkv, causal in ((1, True), (4, False), (2, True)):
        q, k, v = (inp.randn(1, 4, 5, 16, dtype=dtype), inp.randn(1, hkv, 5, 16, dtype=dtype),
                   inp.randn(1, hkv, 5, 16, dtype=dtype))
        out = distfuse.attention_all_gather(q, k, v, group_name, is_causal=causal)
        assert_close(f"attention_all_gather Hkv={hkv} causal={causal}", out,
                     ref.attention_all_gather(q, k, v, oracle_group, causal, precise=True), dtype)
    x = inp.randn(3, 37, dtype=dtype)
    residual = inp.randn(3, 37, dtype=dtype, shared=True)
    weight = inp.randn(37, dtype=dtype, shared=True, scale=0.2, offset=1.0)
    normed, summed = distfuse.all_reduce_rms_norm(x, residual, weight, 1e-6, group_name)
    r_normed, r_summed = ref.all_reduce_rms_norm(x, residual, weight, 1e-6, oracle_group, precise=True)
    assert_close("all_reduce_rms_norm (sum)", summed, r_summed, dtype)
    assert_close("all_reduce_rms_norm (normed)", normed, r_normed, dtype)
    assert_same_on_all_ranks("all_reduce_rms_norm (normed)", normed, pg)


def expect_error(fn, *fragments, exc=(RuntimeError, ValueError)):
    """fn() must raise exc with every fragment in its message."""
    try:
        fn()
    except exc as e:  # noqa: PERF203
        msg = str(e)
        missing = [f for f in fragments if f not in msg]
        assert not missing, f"error message lacks {missing}: {msg!r}"
        return msg
    raise AssertionError(f"no error raised; expected one mentioning {fragments}")


# ----------------------------------------------------------------------------- bodies

def _oracle_body(rank, world, group_name):
    n = check_random_vs_oracle(rank, world, group_name, "cpu", DTYPES, group_name)
    assert n > 100
    check_integer_exact(rank, world, group_name, "cpu", DTYPES, group_name)
    check_global_semantics(rank, world, group_name, "cpu", torch.float32, group_name)


def _opcheck_body(rank, world, group_name):
    ops = torch.ops.distfuse
    g = torch.Generator().manual_seed(rank)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    samples = []
    for dt in (torch.float32, torch.bfloat16):
        samples += [
            (ops.all_reduce.default, (r(3, 37, dtype=dt), group_name), {}),
            (ops.all_reduce.default, (r(2, 3, 5, dtype=dt), group_name), {}),
            (ops.matmul_all_reduce.default, (r(3, 13, dtype=dt), r(13, 11, dtype=dt), group_name), {}),
            (ops.matmul_all_reduce.default, (r(2, 3, 13, dtype=dt), r(11, 13, dtype=dt).t(), group_name),
             {"bias": r(11, dtype=dt)}),
            (ops.matmul_reduce_scatter.default, (r(2, 3, 13, dtype=dt), r(13, 11, dtype=dt), group_name), {}),
            (ops.matmul_reduce_scatter.default, (r(4, 13, dtype=dt), r(13, 7, dtype=dt), group_name), {}),
            (ops.all_gather_matmul.default, (r(3, 21, dtype=dt), r(21, 11, dtype=dt), group_name), {}),
            (ops.attention_all_gather.default,
             (r(2, 4, 5, 16, dtype=dt), r(2, 1, 5, 16, dtype=dt), r(2, 1, 5, 16, dtype=dt), group_name),
             {"is_causal": True}),
            (ops.attention_all_gather.default,
             (r(1, 4, 3, 16, dtype=dt), r(1, 4, 3, 16, dtype=dt), r(1, 4, 3, 16, dtype=dt), group_name),
             {"is_causal": False, "scale": 0.3}),
            (ops.all_reduce_rms_norm.default,
             (r(3, 37, dtype=dt), r(3, 37, dtype=dt), r(37, dtype=dt), 1e-6, group_name), {}),
        ]
    covered = set()
    for op, args, kwargs in samples:
        torch.library.opcheck(op, args, kwargs)
        covered.add(op.__name__.split(".")[0])
    assert covered == {"all_reduce", "matmul_all_reduce", "matmul_reduce_scatter", "all_gather_matmul",
                       "attention_all_gather", "all_reduce_rms_norm"}, covered


def check_errors(rank, world, group_name, device):
    """Bad arguments raise an error naming the op, the argument and the values.
    All validation happens before any collective, so the group stays usable."""
    import distfuse
    ops = torch.ops.distfuse
    dev = torch.device(device)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=dev)

    # wrong rank of tensor
    expect_error(lambda: ops.matmul_all_reduce(t(5), t(5, 3), group_name),
                 "matmul_all_reduce", "a must have shape", "[5]")
    expect_error(lambda: ops.matmul_all_reduce(t(3, 5), t(5, 3, 2), group_name),
                 "matmul_all_reduce", "b must have shape (K, N)", "[5, 3, 2]")
    expect_error(lambda: ops.matmul_reduce_scatter(t(4, 5), t(5), group_name),
                 "matmul_reduce_scatter", "b must have shape (K, N)", "[5]")
    expect_error(lambda: ops.all_gather_matmul(t(5), t(5, 3), group_name),
                 "all_gather_matmul", "a must have shape", "[5]")
    expect_error(lambda: ops.attention_all_gather(t(2, 3, 8), t(2, 1, 3, 8), t(2, 1, 3, 8), group_name),
                 "attention_all_gather", "q must have shape", "[2, 3, 8]")
    expect_error(lambda: ops.attention_all_gather(t(1, 4, 3, 8), t(4, 3, 8), t(4, 3, 8), group_name),
                 "attention_all_gather", "k must have shape", "[4, 3, 8]")
    # K mismatch
    expect_error(lambda: ops.matmul_all_reduce(t(3, 5), t(6, 4), group_name),
                 "matmul_all_reduce", "b must have shape (K, N)", "5", "[6, 4]")
    expect_error(lambda: ops.matmul_reduce_scatter(t(4, 5), t(6, 4), group_name),
                 "matmul_reduce_scatter", "K = a.size(-1) = 5", "[6, 4]")
    expect_error(lambda: ops.all_gather_matmul(t(2, 3, 5), t(7, 4), group_name),
                 "all_gather_matmul", "K = a.size(-1) = 5", "[7, 4]")
    # dtype mismatch
    expect_error(lambda: ops.matmul_all_reduce(t(3, 5, dtype=torch.bfloat16), t(5, 4), group_name),
                 "matmul_all_reduce", "b must have the dtype of a", "BFloat16", "Float")
    expect_error(lambda: ops.matmul_all_reduce(t(3, 5), t(5, 4), group_name, bias=t(4, dtype=torch.float16)),
                 "matmul_all_reduce", "bias must have the dtype of a", "Half")
    expect_error(lambda: ops.attention_all_gather(t(1, 4, 3, 8, dtype=torch.bfloat16), t(1, 1, 3, 8),
                                                  t(1, 1, 3, 8), group_name),
                 "attention_all_gather", "k must have the dtype of q", "BFloat16", "Float")
    expect_error(lambda: ops.all_reduce_rms_norm(t(3, 7), t(3, 7), t(7, dtype=torch.bfloat16), 1e-6,
                                                 group_name),
                 "all_reduce_rms_norm", "weight must have the dtype of x", "BFloat16")
    expect_error(lambda: ops.matmul_all_reduce(torch.ones(3, 5, dtype=torch.int32, device=dev),
                                               torch.ones(5, 4, dtype=torch.int32, device=dev), group_name),
                 "matmul_all_reduce", "a must be bfloat16, float16, float32 or float64", "Int")
    f8 = torch.float8_e4m3fn
    expect_error(lambda: ops.matmul_all_reduce(t(3, 5).to(f8), t(5, 4).to(f8), group_name),
                 "matmul_all_reduce", "a must be bfloat16", "Float8_e4m3fn")
    expect_error(lambda: ops.all_reduce_rms_norm(t(3, 7).to(f8), t(3, 7).to(f8), t(7).to(f8), 1e-6, group_name),
                 "all_reduce_rms_norm", "x must be bfloat16", "Float8_e4m3fn")
    # sharded dim not divisible by W
    if world > 1:
        expect_error(lambda: ops.matmul_reduce_scatter(t(world + 1, 5), t(5, 4), group_name),
                     "matmul_reduce_scatter", "M", f"= {world + 1}", f"divisible by the group size {world}")
        expect_error(lambda: ops.matmul_reduce_scatter(t(1, world + 1, 5), t(5, 4), group_name),
                     "matmul_reduce_scatter", f"= {world + 1}", f"group size {world}")
    # unknown group name, for every op
    bad = "no_such_group"
    for name, fn in [
        ("all_reduce", lambda: ops.all_reduce(t(3), bad)),
        ("matmul_all_reduce", lambda: ops.matmul_all_reduce(t(3, 5), t(5, 4), bad)),
        ("matmul_reduce_scatter", lambda: ops.matmul_reduce_scatter(t(4, 5), t(5, 4), bad)),
        ("all_gather_matmul", lambda: ops.all_gather_matmul(t(3, 5), t(5, 4), bad)),
        ("attention_all_gather", lambda: ops.attention_all_gather(t(1, 4, 3, 8), t(1, 1, 3, 8),
                                                                  t(1, 1, 3, 8), bad)),
        ("all_reduce_rms_norm", lambda: ops.all_reduce_rms_norm(t(3, 7), t(3, 7), t(7), 1e-6, bad)),
    ]:
        expect_error(fn, f"distfuse.{name}", "group_name", bad)
    # Hkv does not divide Hq; k/v mismatch
    expect_error(lambda: ops.attention_all_gather(t(1, 4, 3, 8), t(1, 3, 3, 8), t(1, 3, 3, 8), group_name),
                 "attention_all_gather", "Hkv = 3", "Hq = 4")
    expect_error(lambda: ops.attention_all_gather(t(1, 4, 3, 8), t(1, 2, 3, 8), t(1, 2, 3, 9), group_name),
                 "attention_all_gather", "v must have the shape of k", "[1, 2, 3, 9]")
    expect_error(lambda: ops.attention_all_gather(t(1, 4, 3, 8), t(1, 2, 5, 8), t(1, 2, 5, 8), group_name),
                 "attention_all_gather", "k must have shape", "[1, 2, 5, 8]")
    expect_error(lambda: ops.attention_all_gather(t(1, 4, 3, 8), t(1, 2, 3, 8), t(1, 2, 3, 8), group_name,
                                                  scale=-1.0),
                 "attention_all_gather", "scale", "-1")
    # all_reduce_rms_norm shapes and eps
    expect_error(lambda: ops.all_reduce_rms_norm(t(3, 7), t(3, 7), t(8), 1e-6, group_name),
                 "all_reduce_rms_norm", "weight must have shape (N,)", "7", "[8]")
    expect_error(lambda: ops.all_reduce_rms_norm(t(3, 7), t(3, 7), t(1, 7), 1e-6, group_name),
                 "all_reduce_rms_norm", "weight must have shape (N,)", "[1, 7]")
    expect_error(lambda: ops.all_reduce_rms_norm(t(3, 7), t(3, 8), t(7), 1e-6, group_name),
                 "all_reduce_rms_norm", "residual must have the shape of x", "[3, 7]", "[3, 8]")
    expect_error(lambda: ops.all_reduce_rms_norm(t(3, 7), t(3, 7), t(7), 0.0, group_name),
                 "all_reduce_rms_norm", "eps must be > 0", "0")
    # bias shape
    expect_error(lambda: ops.matmul_all_reduce(t(3, 5), t(5, 4), group_name, bias=t(5)),
                 "matmul_all_reduce", "bias must have shape (N,)", "4", "[5]")
    expect_error(lambda: ops.matmul_all_reduce(t(3, 5), t(5, 4), group_name, bias=t(1, 4)),
                 "matmul_all_reduce", "bias must have shape (N,)", "[1, 4]")
    # a group that is neither a ProcessGroup, its name nor None; workspace arguments
    expect_error(lambda: distfuse.all_reduce(t(4), 0), "group must be a torch.distributed ProcessGroup",
                 "int 0", exc=TypeError)
    expect_error(lambda: distfuse.init_workspace(group_name, timeout_ms=-1), "init_workspace",
                 "timeout_ms must be an int >= 0", "-1")
    expect_error(lambda: distfuse.init_workspace(group_name, max_bytes=1.5), "init_workspace",
                 "max_bytes must be an int >= 0", "1.5")
    # the group is still in step after all those errors
    x = torch.full((4,), float(rank + 1), device=dev)
    assert torch.equal(distfuse.all_reduce(x, group_name).cpu(),
                       torch.full((4,), float(world * (world + 1) // 2)))


def _errors_body(rank, world, group_name):
    check_errors(rank, world, group_name, "cpu")


def _fake_compile_body(rank, world, group_name):
    from torch._subclasses.fake_tensor import FakeTensorMode
    import distfuse
    ops = torch.ops.distfuse

    # Fake kernels: shape and dtype from the inputs and the group size only.
    with FakeTensorMode():
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.empty(2, 3, 37, dtype=dt)
            out = ops.all_reduce(x, group_name)
            assert (out.shape, out.dtype) == (x.shape, dt)
            out = ops.all_reduce(torch.empty(13, 6, dtype=dt).t(), group_name)
            assert out.shape == (6, 13) and out.is_contiguous()
            a, b = torch.empty(2, 3, 13, dtype=dt), torch.empty(13, 11, dtype=dt)
            out = ops.matmul_all_reduce(a, b, group_name, bias=torch.empty(11, dtype=dt))
            assert (out.shape, out.dtype) == ((2, 3, 11), dt)
            out = ops.matmul_all_reduce(torch.empty(1, 13, dtype=dt), torch.empty(11, 13, dtype=dt).t(),
                                        group_name)
            assert (out.shape, out.dtype) == ((1, 11), dt)
            out = ops.matmul_reduce_scatter(torch.empty(2, 3 * world, 13, dtype=dt), b, group_name)
            assert (out.shape, out.dtype) == ((6, 11), dt)
            out = ops.all_gather_matmul(torch.empty(3, 21, dtype=dt), torch.empty(21, 11, dtype=dt), group_name)
            assert (out.shape, out.dtype) == ((3 * world, 11), dt)
            q, k = torch.empty(2, 4, 5, 16, dtype=dt), torch.empty(2, 1, 5, 16, dtype=dt)
            out = ops.attention_all_gather(q, k, k, group_name, is_causal=True)
            assert (out.shape, out.dtype) == ((2, 4, 5, 16), dt)
            x, w = torch.empty(2, 5, 37, dtype=dt), torch.empty(37, dtype=dt)
            normed, summed = ops.all_reduce_rms_norm(x, x, w, 1e-6, group_name)
            assert (normed.shape, normed.dtype, summed.shape, summed.dtype) == (x.shape, dt, x.shape, dt)
        if world > 1:
            expect_error(lambda: ops.matmul_reduce_scatter(torch.empty(world + 1, 13), torch.empty(13, 11),
                                                           group_name),
                         "matmul_reduce_scatter", f"= {world + 1}", f"group size {world}")
        # Bad operands fail while tracing, with the real ops' wording.
        e = torch.empty
        expect_error(lambda: ops.matmul_all_reduce(e(3, 5), e(6, 4), group_name),
                     "matmul_all_reduce", "b must have shape (K, N) with K = a.size(-1) = 5", "[6, 4]")
        expect_error(lambda: ops.matmul_all_reduce(e(3, 5), e(5, 4), group_name, bias=e(7)),
                     "matmul_all_reduce", "bias must have shape (N,) with N = b.size(1) = 4", "[7]")
        expect_error(lambda: ops.matmul_all_reduce(e(3, 5, dtype=torch.bfloat16), e(5, 4), group_name),
                     "matmul_all_reduce", "b must have the dtype of a")
        expect_error(lambda: ops.matmul_reduce_scatter(e(4, 5), e(6, 4), group_name),
                     "matmul_reduce_scatter", "K = a.size(-1) = 5", "[6, 4]")
        expect_error(lambda: ops.all_gather_matmul(e(5), e(5, 3), group_name),
                     "all_gather_matmul", "a must have shape", "[5]")
        expect_error(lambda: ops.all_gather_matmul(e(3, 5, dtype=torch.float8_e4m3fn),
                                                   e(5, 3, dtype=torch.float8_e4m3fn), group_name),
                     "all_gather_matmul", "a must be bfloat16, float16, float32 or float64")
        expect_error(lambda: ops.attention_all_gather(e(1, 4, 3, 8), e(1, 3, 3, 8), e(1, 3, 3, 8), group_name),
                     "attention_all_gather", "Hkv = 3", "Hq = 4")
        expect_error(lambda: ops.attention_all_gather(e(1, 4, 3, 8), e(1, 2, 3, 8), e(1, 2, 3, 9), group_name),
                     "attention_all_gather", "v must have the shape of k")
        expect_error(lambda: ops.all_reduce_rms_norm(e(3, 7), e(3, 7), e(6), 1e-6, group_name),
                     "all_reduce_rms_norm", "weight must have shape (N,) with N = x.size(-1) = 7", "[6]")
        expect_error(lambda: ops.all_reduce_rms_norm(e(3, 7), e(3, 7), e(7), 0.0, group_name),
                     "all_reduce_rms_norm", "eps must be > 0")
    # A meta operand beside a real one reaches the Meta kernel (the fake): an error, not
    # an uninitialized result.
    expect_error(lambda: ops.matmul_all_reduce(torch.randn(4, 8), torch.empty(8, 8, device="meta"), group_name),
                 "matmul_all_reduce", "b must be on the device of a")
    expect_error(lambda: ops.all_reduce_rms_norm(torch.randn(3, 8), torch.randn(3, 8), torch.empty(8, device="meta"),
                                                 1e-6, group_name),
                 "all_reduce_rms_norm", "weight must be on the device of x")

    # Fake shapes equal real shapes (strides too) for a sample of real calls.
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, world, 13, generator=g)
    b = torch.randn(7, 13, generator=g).t()
    bias = torch.randn(7, generator=torch.Generator().manual_seed(1))
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    calls = [
        lambda: ops.all_reduce(x.transpose(0, 1), group_name),
        lambda: ops.matmul_all_reduce(x, b, group_name, bias=bias),
        lambda: ops.matmul_reduce_scatter(x, b, group_name),
        lambda: ops.all_gather_matmul(x, b, group_name),
        lambda: ops.attention_all_gather(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, group_name),
        lambda: ops.all_reduce_rms_norm(x.transpose(0, 1), x.transpose(0, 1), x[0, 0], 1e-6, group_name),
    ]
    for i, call in enumerate(calls):
        real = call()
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = call()
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r_out, f_out in zip(real, fake):
            assert (f_out.shape, f_out.stride(), f_out.dtype) == (r_out.shape, r_out.stride(), r_out.dtype), \
                (i, f_out.shape, f_out.stride(), r_out.shape, r_out.stride())

    # torch.compile(fullgraph) of a function that calls every op matches eager.
    def layer(x, a, b, bias, a_rs, a_ag, b_ag, q, k, v, residual, weight):
        y0 = distfuse.all_reduce(x, group_name)
        y1 = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
        y2 = distfuse.matmul_reduce_scatter(a_rs, b, group_name)
        y3 = distfuse.all_gather_matmul(a_ag, b_ag, group_name)
        y4 = distfuse.attention_all_gather(q, k, v, group_name, is_causal=True)
        y5, y6 = distfuse.all_reduce_rms_norm(y1, residual, weight, 1e-6, group_name)
        return y0 * 2, y1, y2 + 1, y3, y4, y5, y6

    def inputs(m, dt):
        gg = torch.Generator().manual_seed(100 * m + rank)

        def r(*s):
            return torch.randn(*s, generator=gg).to(dt)
        gs = torch.Generator().manual_seed(100 * m)  # replicated inputs
        return (r(m, 9), r(m, 13), r(13, 11), torch.randn(11, generator=gs).to(dt), r(world * m, 13),
                r(m, 21), r(21, 11), r(1, 4, m, 16), r(1, 1, m, 16), r(1, 1, m, 16),
                torch.randn(m, 11, generator=gs).to(dt), torch.randn(11, generator=gs).to(dt))

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for m, dt in ((3, torch.float32), (5, torch.float32), (3, torch.bfloat16)):
        args = inputs(m, dt)
        eager = layer(*args)
        got = compiled(*args)
        for i, (e, c) in enumerate(zip(eager, got)):
            assert e.shape == c.shape and e.dtype == c.dtype, (m, dt, i, e.shape, c.shape)
            assert torch.equal(e, c), f"compiled output {i} differs from eager (M={m}, {dt})"
    torch._dynamo.reset()


def check_call_checks(rank, world, group_name, device, dtype):
    """Under distfuse.check_calls: matching calls run as without it; a call that differs
    between ranks raises ValueError on every rank, naming each rank's call."""
    import distfuse
    from distfuse import ops
    before = ops._call_checks
    kind = f"{str(dtype).replace('torch.', '')} {device.type}"
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16

    def full(shape, value):
        return torch.full(shape, float(value), device=device, dtype=dtype)

    a, b, bias = full((3, 4), rank + 1), full((4, 2), 1), torch.arange(2.0, device=device).to(dtype)
    triangle = world * (world + 1) // 2
    with distfuse.check_calls():
        # The same call on every rank: checked, then run as without the check.
        got = distfuse.matmul_all_reduce(a, b, group_name, bias=bias)
        assert torch.equal(got, full((3, 2), 4 * triangle) + bias), got
        assert torch.equal(distfuse.all_reduce(a, group_name), full((3, 4), triangle))
        # The last rank passes another M: every rank raises, naming each rank's shapes.
        with pytest.raises(ValueError) as info:
            distfuse.matmul_all_reduce(full((4 if rank == world - 1 else 3, 4), 1), b, group_name, bias=bias)
        msg = str(info.value)
        assert f"distfuse.matmul_all_reduce: the ranks of group {group_name!r} did not make the same call" in msg, msg
        assert f"rank 0: a (3, 4) {kind}, b (4, 2) {kind}, bias (2,) {kind}" in msg, msg
        assert f"rank {world - 1}: a (4, 4) {kind}" in msg, msg
        # Another dtype, or bias, a forced path or a tuning override on one rank only.
        with pytest.raises(ValueError, match=f"rank 0: x \\(5,\\) {kind}"):
            distfuse.all_reduce(torch.ones(5, device=device, dtype=dtype if rank == 0 else other), group_name)
        with pytest.raises(ValueError, match="bias None"):
            distfuse.matmul_all_reduce(a, b, group_name, bias=bias if rank == 0 else None)
        with distfuse.force_path("all_reduce", "reference" if rank == 0 else "auto"):
            with pytest.raises(ValueError, match="forced path reference"):
                distfuse.all_reduce(a, group_name)
        with distfuse.tuning({"all_reduce.two_shot_blocks": 8 if rank == 0 else 0}):
            with pytest.raises(ValueError, match="tuning all_reduce.two_shot_blocks=8"):
                distfuse.matmul_all_reduce(a, b, group_name)
        # Every rank took the same decision, so the group still works.
        assert torch.equal(distfuse.all_reduce(a, group_name), full((3, 4), triangle))
    assert ops._call_checks == before  # restored on leaving the block


def _call_checks_body(rank, world, group_name, from_env):
    from distfuse import ops
    assert ops._call_checks == from_env  # DISTFUSE_CHECK_CALLS=1 turns the checks on at import
    check_call_checks(rank, world, group_name, torch.device("cpu"), torch.float32)


def _w8_body(rank, world, group_name):
    assert world == 8
    for dtype in (torch.float32, torch.bfloat16):
        call_every_op_once(rank, world, group_name, "cpu", dtype, group_name)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("world", [1, 2, 4])
def test_ops_vs_oracle(world):
    """Every op, random odd sizes, fp32/bf16/fp16, vs the float64 oracle; integer-valued
    inputs exactly; replicated outputs bitwise across ranks; sharding semantics vs the
    unsharded computation."""
    run_distributed(_oracle_body, world)


def test_opcheck():
    run_distributed(_opcheck_body, 2)


def test_errors():
    run_distributed(_errors_body, 2)


def test_fake_kernels_and_compile():
    run_distributed(_fake_compile_body, 2)


@pytest.mark.parametrize("from_env", [False, True])
def test_call_checks_name_each_ranks_call(from_env):
    """distfuse.check_calls (or DISTFUSE_CHECK_CALLS=1): a call whose shapes, dtypes,
    devices, arguments, forced path or tuning overrides differ between ranks raises ValueError on
    every rank, naming each rank's call, instead of reaching the kernels."""
    run_distributed(_call_checks_body, 3, args=(from_env,),
                    env={"DISTFUSE_CHECK_CALLS": "1"} if from_env else None)


def test_world_8():
    run_distributed(_w8_body, 8)


def test_reference_single_process():
    """The oracle at W=1 agrees with the plain single-device formulas (no spawn)."""
    import os
    import tempfile
    from distfuse import _reference as ref
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rdv')}", rank=0, world_size=1)
        try:
            g = torch.Generator().manual_seed(0)
            a, b, bias = (torch.randn(4, 6, generator=g), torch.randn(6, 5, generator=g),
                          torch.randn(5, generator=g))
            torch.testing.assert_close(ref.matmul_all_reduce(a, b, None, bias), a @ b + bias)
            torch.testing.assert_close(ref.matmul_reduce_scatter(a, b), a @ b)
            torch.testing.assert_close(ref.all_gather_matmul(a, b, precise=True), (a @ b).double())
            q, k = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
            torch.testing.assert_close(ref.attention_all_gather(q, k, k, is_causal=True),
                                       F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True))
            x, res, w = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(7, generator=g)
            normed, summed = ref.all_reduce_rms_norm(x, res, w, 1e-6)
            torch.testing.assert_close(summed, x + res)
            torch.testing.assert_close(normed, F.rms_norm(x + res, (7,), w, 1e-6))
            x16 = x.to(torch.bfloat16)
            assert ref.all_reduce(x16).dtype == torch.bfloat16
            assert ref.all_reduce(x16, precise=True).dtype == torch.float64
        finally:
            dist.destroy_process_group()


def test_tuning_overrides_are_scoped_and_checked():
    """distfuse.tuning sets dispatch-table overrides for a block and restores the previous ones."""
    import distfuse
    get = torch.ops.distfuse._get_tuning
    key = "matmul_all_reduce.consumer_blocks"
    assert get(key) == 0
    with distfuse.tuning({key: 16, "matmul_all_reduce.group_tiles": 4}):
        assert get(key) == 16 and get("matmul_all_reduce.group_tiles") == 4
        with distfuse.tuning({key: 32}):
            assert get(key) == 32
        assert get(key) == 16
    assert get(key) == 0 and get("matmul_all_reduce.group_tiles") == 0
    with pytest.raises(ValueError, match="distfuse.tuning: key must be one of"):
        with distfuse.tuning({"matmul_all_reduce.consumers": 8}):
            pass
    with pytest.raises(ValueError, match="consumer_blocks must be an int >= 0, got -1"):
        with distfuse.tuning({key: -1}):
            pass
    with pytest.raises(ValueError, match="consumer_blocks must be an int >= 0, got True"):
        with distfuse.tuning({key: True}):
            pass
    assert get(key) == 0
