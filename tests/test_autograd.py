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


def body_ops_without_backward_raise(rank, world, group_name):
    """The ops without a backward formula run forward on tensors that require grad (the
    same result as without), and their backward raises, naming the op, instead of
    differentiating through the kernels' internals."""
    import distfuse
    torch.manual_seed(3)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).requires_grad_()

    calls = {
        "matmul_reduce_scatter": lambda t: distfuse.matmul_reduce_scatter(t[0], t[1], group_name),
        "all_gather_matmul": lambda t: distfuse.all_gather_matmul(t[0], t[1], group_name),
        "attention_all_gather": lambda t: distfuse.attention_all_gather(t[0], t[1], t[2], group_name,
                                                                          is_causal=True),
        "all_reduce_rms_norm": lambda t: distfuse.all_reduce_rms_norm(t[0], t[1], t[2], 1e-6, group_name)[0],
    }
    operands = {
        "matmul_reduce_scatter": (leaf(4, 6), leaf(6, 5)),
        "all_gather_matmul": (leaf(3, 6), leaf(6, 5)),
        "attention_all_gather": (leaf(1, 2, 3, 8), leaf(1, 2, 3, 8), leaf(1, 2, 3, 8)),
        "all_reduce_rms_norm": (leaf(3, 8), leaf(3, 8), leaf(8)),
    }
    for op, call in calls.items():
        with torch.no_grad():
            expected = call(operands[op])
        out = call(operands[op])
        assert torch.equal(out, expected), op
        with pytest.raises(RuntimeError, match=f"distfuse.{op} has no backward formula"):
            out.sum().backward()


def test_ops_without_backward_raise():
    run_distributed(body_ops_without_backward_raise, 2)


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
