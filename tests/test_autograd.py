"""Backward of the fused ops (tensor-parallel semantics) against the unsharded layer."""
import pytest
import torch
from torch import nn

from dist_harness import run_distributed


def body_row_parallel_backward(rank, world, group_name):
    import distfuse
    torch.manual_seed(0)  # same full weights and inputs on every rank
    x = torch.randn(5, 3, 8 * world, dtype=torch.float64)
    w = torch.randn(12, 8 * world, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    grad_out = torch.randn(5, 3, 12, dtype=torch.float64)
    # Unsharded reference.
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, bias))
    torch.nn.functional.linear(xr, wr, br).backward(grad_out)
    # This rank's shard of the input features.
    cols = slice(rank * 8, (rank + 1) * 8)
    xs = x[..., cols].clone().requires_grad_()
    ws = w[:, cols].clone().requires_grad_()
    bs = bias.clone().requires_grad_()
    y = distfuse.matmul_all_reduce(xs, ws.t(), group_name, bias=bs)
    y.backward(grad_out)
    torch.testing.assert_close(xs.grad, xr.grad[..., cols])
    torch.testing.assert_close(ws.grad, wr.grad[:, cols])
    torch.testing.assert_close(bs.grad, br.grad)
    # all_reduce: identity backward (the output gradient is replicated).
    z = torch.randn(4, dtype=torch.float64, requires_grad=True)
    distfuse.all_reduce(z, group_name).backward(torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(z.grad, torch.ones(4, dtype=torch.float64))


def test_row_parallel_backward_matches_unsharded():
    run_distributed(body_row_parallel_backward, 2)


def body_matmul_all_reduce_backward_without_bias(rank, world, group_name):
    import distfuse
    torch.manual_seed(1)
    x = torch.randn(6, 4 * world, dtype=torch.float64)
    w = torch.randn(5, 4 * world, dtype=torch.float64)
    grad_out = torch.randn(6, 5, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr.t()).backward(grad_out)
    cols = slice(rank * 4, (rank + 1) * 4)
    xs, ws = x[:, cols].clone().requires_grad_(), w[:, cols].clone().requires_grad_()
    distfuse.matmul_all_reduce(xs, ws.t(), group_name).backward(grad_out)
    torch.testing.assert_close(xs.grad, xr.grad[:, cols])
    torch.testing.assert_close(ws.grad, wr.grad[:, cols])


def test_matmul_all_reduce_backward_without_bias():
    run_distributed(body_matmul_all_reduce_backward_without_bias, 2)


def _close(tag, got, want):
    torch.testing.assert_close(got, want, msg=lambda m: f"{tag}: {m}")


def _check_grads(tag, pairs):
    """(name, leaf, the unsharded gradient sliced for this rank or None where the leaf does
    not require grad, whether the leaf holds its operand transposed): each leaf's gradient
    against it, and no gradient where none is due."""
    for name, leaf, want, transposed in pairs:
        if want is None:
            assert leaf.grad is None, f"{tag} {name}: a gradient for a leaf that does not require grad"
        else:
            _close(f"{tag} {name}", leaf.grad, want.transpose(-1, -2) if transposed else want)


def _unsharded_grads(fn, tensors, upstream):
    """Gradients of sum(fn(*tensors) · upstream) by torch autograd on the unsharded computation."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs, ups = (out, upstream) if isinstance(out, tuple) else ((out,), (upstream,))
    torch.autograd.backward(outs, ups)
    return [t.grad for t in leaves]


def _leaf(t, requires_grad, transposed=False):
    """A leaf holding t (stored transposed when asked: the op then gets a non-contiguous
    view) and the view passed to the op."""
    if transposed:
        leaf = t.transpose(-1, -2).contiguous().requires_grad_(requires_grad)
        return leaf, leaf.transpose(-1, -2)
    leaf = t.clone().requires_grad_(requires_grad)
    return leaf, leaf


def body_sharded_op_grads(rank, world, group_name, check_compile):
    """Every input gradient of matmul_reduce_scatter, all_gather_matmul, all_reduce_rms_norm
    and attention_all_gather against torch autograd on the unsharded computation (fp64),
    with one random upstream gradient of the full output of which each rank gets its part;
    inputs that do not require grad get none; non-contiguous views as operands."""
    import distfuse
    torch.set_num_threads(1)
    f64 = torch.float64

    # 1. matmul_reduce_scatter: out_r = rows r of A @ B, rank r holding A's columns and B's rows r.
    torch.manual_seed(10)
    k, n = 3, 5
    A = torch.randn(2, 3 * world, k * world, dtype=f64)  # 3-D: M = 6·W rows
    B = torch.randn(k * world, n, dtype=f64)
    G = torch.randn(6 * world, n, dtype=f64)
    m = 6  # rows of the output per rank
    dA, dB = _unsharded_grads(lambda a, b: a.reshape(-1, a.shape[-1]) @ b, (A, B), G)
    cols, rows = slice(rank * k, (rank + 1) * k), slice(rank * m, (rank + 1) * m)
    for need_a, need_b, a_2d in ((True, True, False), (True, False, True), (False, True, False)):
        a_full = A.reshape(-1, A.shape[-1]) if a_2d else A
        a_leaf, a = _leaf(a_full[..., cols], need_a, transposed=a_2d)
        b_leaf, b = _leaf(B[cols], need_b, transposed=True)  # b: a transposed view
        distfuse.matmul_reduce_scatter(a, b, group_name).backward(G[rows])
        _check_grads(f"matmul_reduce_scatter (a {tuple(a.shape)}, needs {need_a, need_b})",
                     [("a", a_leaf, dA.reshape(a_full.shape)[..., cols] if need_a else None, a_2d),
                      ("b", b_leaf, dB[cols] if need_b else None, True)])

    # 2. all_gather_matmul: out_r = A @ B[:, cols r], rank r holding A's rows r.
    torch.manual_seed(11)
    k, n, m = 4, 2, 3
    A = torch.randn(m * world, k, dtype=f64)
    B = torch.randn(k, n * world, dtype=f64)
    G = torch.randn(m * world, n * world, dtype=f64)
    dA, dB = _unsharded_grads(lambda a, b: a @ b, (A, B), G)
    cols, rows = slice(rank * n, (rank + 1) * n), slice(rank * m, (rank + 1) * m)
    for need_a, need_b, a_3d in ((True, True, False), (True, False, True), (False, True, False)):
        a_leaf, a = _leaf(A[rows].reshape(1, m, k) if a_3d else A[rows], need_a)
        b_leaf, b = _leaf(B[:, cols], need_b, transposed=True)
        distfuse.all_gather_matmul(a, b, group_name).backward(G[:, cols])
        _check_grads(f"all_gather_matmul (a {tuple(a.shape)}, needs {need_a, need_b})",
                     [("a", a_leaf, dA[rows].reshape(a.shape) if need_a else None, False),
                      ("b", b_leaf, dB[:, cols] if need_b else None, True)])

    # 3. all_reduce_rms_norm: (y, h), h = Σ_s X_s + R, replicated, as is their gradient.
    # X and R are multiples of 1/32, so that h is exact although the CPU kernel forms it in
    # fp32 (csrc/ops/reference.cpp): then gradients compare at fp64 tolerances.
    torch.manual_seed(12)
    eps, shape = 1e-6, (2, 3, 8)
    X = torch.randint(-64, 65, (world, *shape)).to(f64) / 32
    R = torch.randint(-64, 65, shape).to(f64) / 32
    Wt = torch.rand(8, dtype=f64) + 0.5
    Gy, Gh = torch.randn(shape, dtype=f64), torch.randn(shape, dtype=f64)

    def rms_norm_full(x, r, w):
        h = x.sum(0) + r
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w, h

    for need_w, with_gh, x_t in ((True, True, False), (False, True, True), (True, False, False)):
        dX, dR, dW = _unsharded_grads(rms_norm_full, (X, R, Wt), (Gy, Gh if with_gh else torch.zeros_like(Gh)))
        x_leaf, x = _leaf(X[rank], True, transposed=x_t)
        r_leaf, r = _leaf(R, True)
        w_leaf, w = _leaf(Wt, need_w)
        y, h = distfuse.all_reduce_rms_norm(x, r, w, eps, group_name)
        torch.autograd.backward((y, h) if with_gh else (y,), (Gy, Gh) if with_gh else (Gy,))
        _check_grads(f"all_reduce_rms_norm (needs weight {need_w}, gh {with_gh})",
                     [("x", x_leaf, dX[rank], x_t), ("residual", r_leaf, dR, False),
                      ("weight", w_leaf, dW if need_w else None, False)])

    # 4. attention_all_gather: rank r holds tokens r of Q, K, V; out_r = tokens r of the output.
    torch.manual_seed(13)
    bsz, s, d = 2, 3, 8

    def attention_full(q, k, v, is_causal, scale):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) * (scale if scale is not None else d ** -0.5)
        if is_causal:
            n_tok = q.shape[2]
            scores = scores.masked_fill(torch.ones(n_tok, n_tok, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v

    tokens = slice(rank * s, (rank + 1) * s)
    for is_causal, hq, hkv, scale, needs in ((False, 2, 2, None, (True,) * 3), (True, 2, 2, None, (True,) * 3),
                                             (True, 4, 2, 0.3, (True,) * 3), (False, 4, 2, 0.7, (True,) * 3),
                                             (True, 4, 2, None, (False, True, True)),
                                             (True, 2, 2, 0.5, (True, False, False))):
        Q = torch.randn(bsz, hq, s * world, d, dtype=f64)
        K, V = (torch.randn(bsz, hkv, s * world, d, dtype=f64) for _ in range(2))
        G = torch.randn(bsz, hq, s * world, d, dtype=f64)
        dQ, dK, dV = _unsharded_grads(lambda q, k, v: attention_full(q, k, v, is_causal, scale), (Q, K, V), G)
        q_leaf, q = _leaf(Q[:, :, tokens], needs[0])
        k_leaf, k = _leaf(K[:, :, tokens], needs[1], transposed=True)  # a non-contiguous k
        v_leaf, v = _leaf(V[:, :, tokens], needs[2])
        distfuse.attention_all_gather(q, k, v, group_name, is_causal=is_causal, scale=scale).backward(
            G[:, :, tokens])
        _check_grads(f"attention_all_gather (causal {is_causal}, Hq {hq}, Hkv {hkv}, scale {scale}, "
                     f"needs {needs})",
                     [("q", q_leaf, dQ[:, :, tokens] if needs[0] else None, False),
                      ("k", k_leaf, dK[:, :, tokens] if needs[1] else None, True),
                      ("v", v_leaf, dV[:, :, tokens] if needs[2] else None, False)])

    if check_compile:
        # Forward and backward traced by AOTAutograd (the backward's collectives included)
        # against eager.
        torch.manual_seed(14)
        a_c = torch.randn(2, 3 * world, 4, dtype=f64)
        b_c = torch.randn(4, 5, dtype=f64)
        g_c = torch.randn(6, 5, dtype=f64)
        x_c, r_c = (torch.randint(-64, 65, (3, 8)).to(f64) / 32 for _ in range(2))
        w_c = torch.rand(8, dtype=f64) + 0.5
        gy_c, gh_c = torch.randn(3, 8, dtype=f64), torch.randn(3, 8, dtype=f64)

        def mrs(a, b):
            return distfuse.matmul_reduce_scatter(a, b, group_name)

        def arn(x, r, w):
            return distfuse.all_reduce_rms_norm(x, r, w, eps, group_name)

        for name, fn, inputs, upstream in (("matmul_reduce_scatter", mrs, (a_c, b_c), (g_c,)),
                                           ("all_reduce_rms_norm", arn, (x_c, r_c, w_c), (gy_c, gh_c))):
            results = []
            for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
                leaves = [t.clone().requires_grad_() for t in inputs]
                out = f(*leaves)
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, upstream)
                results.append([o.detach() for o in outs] + [t.grad for t in leaves])
            for i, (got, want) in enumerate(zip(results[1], results[0])):
                _close(f"compiled {name} (output or gradient {i})", got, want)

        # opcheck on inputs that require grad: its AOTAutograd check compares each op's
        # traced backward (all four) with its eager one. (test_ops.py's opcheck samples do
        # not require grad, so they check only that an autograd kernel is registered.)
        ops = torch.ops.distfuse

        def rand(*shape):
            return torch.randn(*shape, dtype=f64).requires_grad_()

        for op, args, kwargs in ((ops.matmul_reduce_scatter.default, (rand(2, 3, 4), rand(4, 5), group_name), {}),
                                 (ops.all_gather_matmul.default, (rand(3, 4), rand(4, 5), group_name), {}),
                                 (ops.all_reduce_rms_norm.default, (rand(3, 8), rand(3, 8), rand(8), eps, group_name),
                                  {}),
                                 (ops.attention_all_gather.default,
                                  (rand(2, 4, 3, 8), rand(2, 2, 3, 8), rand(2, 2, 3, 8), group_name),
                                  {"is_causal": True, "scale": 0.3})):
            torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("world,check_compile", [(2, True), (3, False)], ids=["w2+compile", "w3"])
def test_sharded_op_grads_match_unsharded(world, check_compile):
    run_distributed(body_sharded_op_grads, world, args=(check_compile,))


def body_sharded_op_grads_on_gpu(rank, world, group_name):
    # The same checks on CUDA tensors over NCCL (the backward's functional collectives there).
    torch.set_default_device(torch.device("cuda", torch.cuda.current_device()))
    body_sharded_op_grads(rank, world, group_name, False)


@pytest.mark.multigpu
def test_sharded_op_grads_match_unsharded_over_nccl():
    run_distributed(body_sharded_op_grads_on_gpu, 2, backend="nccl")


# ---------------------------------------------------------------- nn layers (Megatron semantics)

def _shard_grads(tp_layer, full_layer, rank, kind):
    """(name, this rank's gradient, the unsharded layer's gradient sliced for this rank)."""
    w, b = tp_layer.weight, tp_layer.bias
    if kind == "column":
        rows = slice(rank * w.shape[0], (rank + 1) * w.shape[0])
        out = [("weight", w.grad, full_layer.weight.grad[rows])]
        if b is not None:
            out.append(("bias", b.grad, full_layer.bias.grad[rows]))
    else:
        cols = slice(rank * w.shape[1], (rank + 1) * w.shape[1])
        out = [("weight", w.grad, full_layer.weight.grad[:, cols])]
        if b is not None:
            out.append(("bias", b.grad, full_layer.bias.grad))
    return out


def body_parallel_linear_grads(rank, world, group_name, check_compile):
    """Column -> relu -> Row (every option), and a gathered column layer, against the
    unsharded nn.Linear layers: the input gradient (replicated), each weight shard's and
    bias's gradient, in fp64 with the same upstream gradient on every rank."""
    from distfuse.nn import ColumnParallelLinear, RowParallelLinear
    torch.set_num_threads(1)
    in_f, hid, out_f = 6 * world, 4 * world, 5
    torch.manual_seed(2)
    full_col = nn.Linear(in_f, hid, dtype=torch.float64)
    full_row = nn.Linear(hid, out_f, dtype=torch.float64)
    x = torch.randn(3, 2, in_f, dtype=torch.float64)
    grad_out = torch.randn(3, 2, out_f, dtype=torch.float64)
    grad_gathered = torch.randn(3, 2, hid, dtype=torch.float64)

    def reference(fn, upstream):
        full_col.zero_grad(), full_row.zero_grad()
        xr = x.clone().requires_grad_()
        fn(xr).backward(upstream)
        return xr.grad

    def check(tag, got, want):
        torch.testing.assert_close(got, want, msg=lambda m: f"{tag}: {m}")

    ref_dx = reference(lambda t: full_row(torch.relu(full_col(t))), grad_out)
    for fused in (True, False):
        col = ColumnParallelLinear.from_unsharded(full_col, group_name)
        row = RowParallelLinear.from_unsharded(full_row, group_name, fused=fused)
        xs = x.clone().requires_grad_()
        row(torch.relu(col(xs))).backward(grad_out)
        tag = f"column -> row (fused={fused})"
        check(f"{tag} input", xs.grad, ref_dx)
        for name, got, want in _shard_grads(col, full_col, rank, "column"):
            check(f"{tag} column {name}", got, want)
        for name, got, want in _shard_grads(row, full_row, rank, "row"):
            check(f"{tag} row {name}", got, want)

    # Row layer taking the full (replicated) input and its own slice of it.
    h = torch.randn(3, 2, hid, dtype=torch.float64)
    full_row.zero_grad()
    hr = h.clone().requires_grad_()
    full_row(hr).backward(grad_out)
    for fused in (True, False):
        row = RowParallelLinear.from_unsharded(full_row, group_name, fused=fused, input_is_parallel=False)
        hs = h.clone().requires_grad_()
        row(hs).backward(grad_out)
        check(f"row, full input (fused={fused}) input", hs.grad, hr.grad)
        for name, got, want in _shard_grads(row, full_row, rank, "row"):
            check(f"row, full input (fused={fused}) {name}", got, want)

    # Column layer with a gathered (replicated) output.
    ref_dx = reference(full_col, grad_gathered)
    col = ColumnParallelLinear.from_unsharded(full_col, group_name, gather_output=True)
    xs = x.clone().requires_grad_()
    col(xs).backward(grad_gathered)
    check("gathered column input", xs.grad, ref_dx)
    for name, got, want in _shard_grads(col, full_col, rank, "column"):
        check(f"gathered column {name}", got, want)

    if check_compile:
        # Forward and backward traced whole (the collectives of the backward included).
        col = ColumnParallelLinear.from_unsharded(full_col, group_name)
        row = RowParallelLinear.from_unsharded(full_row, group_name)
        step = torch.compile(lambda t: row(torch.relu(col(t))), fullgraph=True, backend="aot_eager")
        xs = x.clone().requires_grad_()
        step(xs).backward(grad_out)
        ref_dx = reference(lambda t: full_row(torch.relu(full_col(t))), grad_out)
        check("compiled input", xs.grad, ref_dx)
        for name, got, want in _shard_grads(row, full_row, rank, "row"):
            check(f"compiled row {name}", got, want)


@pytest.mark.parametrize("world,check_compile", [(2, True), (3, False)], ids=["w2+compile", "w3"])
def test_parallel_linear_grads_match_unsharded(world, check_compile):
    run_distributed(body_parallel_linear_grads, world, args=(check_compile,))


def body_tp_llama_layer_grads(rank, world, group_name):
    """The TP decoder layer's input gradient and every parameter's (each shard against its
    slice of the unsharded layer's, the replicated norms whole) in fp64."""
    from distfuse.nn import LlamaConfig, LlamaDecoderLayer, TPLlamaDecoderLayer
    torch.set_num_threads(1)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(3)
    ref = LlamaDecoderLayer(config, dtype=torch.float64)
    with torch.no_grad():
        ref.input_layernorm.weight.uniform_(0.5, 1.5)
        ref.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    tp = TPLlamaDecoderLayer.from_unsharded(ref, group_name)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    grad_out = torch.randn(2, 5, 32, dtype=torch.float64)
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).backward(grad_out)
    tp(xs).backward(grad_out)
    torch.testing.assert_close(xs.grad, xr.grad, msg=lambda m: f"input: {m}")
    for prefix, kind, names in (("self_attn", "column", ("q_proj", "k_proj", "v_proj")),
                                ("self_attn", "row", ("o_proj",)),
                                ("mlp", "column", ("gate_proj", "up_proj")),
                                ("mlp", "row", ("down_proj",))):
        for name in names:
            tp_layer = getattr(getattr(tp, prefix), name)
            full = getattr(getattr(ref, prefix), name)
            for what, got, want in _shard_grads(tp_layer, full, rank, kind):
                torch.testing.assert_close(got, want, msg=lambda m: f"{prefix}.{name}.{what}: {m}")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        torch.testing.assert_close(getattr(tp, norm).weight.grad, getattr(ref, norm).weight.grad,
                                   msg=lambda m: f"{norm}: {m}")


def test_tp_llama_layer_grads_match_unsharded():
    run_distributed(body_tp_llama_layer_grads, 2)
