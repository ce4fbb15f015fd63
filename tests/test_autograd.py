"""Backward of the fused ops (tensor-parallel semantics) against the unsharded layer."""
import torch

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
