"""Backward formulas (tensor-parallel semantics).

In a tensor-parallel layer the output of a sum over ranks is replicated, and so
is the gradient that flows back into it. Hence:
  all_reduce:         forward Σ_r x_r, backward identity (each rank's x_r gets dy);
  matmul_all_reduce:  y = Σ_r a_r @ b_r + bias, so da_r = dy @ b_rᵀ,
                      db_r = a_rᵀ @ dy and dbias = Σ_rows dy, with no communication.
The other ops have no backward formula yet: their backward raises, naming the op,
rather than letting autograd differentiate through their kernels' internals (which
gives wrong gradients, for example none for the gathered operands).
"""
import torch


def _all_reduce_backward(ctx, grad):
    return grad, None


def _matmul_all_reduce_setup(ctx, inputs, output):
    a, b = inputs[0], inputs[1]
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None,
                          b if ctx.needs_input_grad[0] else None)


def _matmul_all_reduce_backward(ctx, grad):
    a, b = ctx.saved_tensors
    n = grad.shape[-1]
    needs = ctx.needs_input_grad  # one entry per argument passed: 3 when bias was left out
    grad_a = grad @ b.t() if needs[0] else None
    grad_b = None
    if needs[1]:
        grad_b = a.reshape(-1, a.shape[-1]).t() @ grad.reshape(-1, n)
    grad_bias = grad.reshape(-1, n).sum(0) if len(needs) > 3 and needs[3] else None
    return grad_a, grad_b, None, grad_bias


def _no_backward(op):
    def backward(ctx, *grads):
        raise RuntimeError(f"distfuse.{op} has no backward formula: call it under torch.no_grad() or "
                           f"on tensors that do not require grad (all_reduce and matmul_all_reduce "
                           f"have backward formulas)")
    return backward


for _op in ("matmul_reduce_scatter", "all_gather_matmul", "attention_all_gather", "all_reduce_rms_norm"):
    torch.library.register_autograd(f"distfuse::{_op}", _no_backward(_op))

torch.library.register_autograd("distfuse::all_reduce", _all_reduce_backward)
torch.library.register_autograd("distfuse::matmul_all_reduce", _matmul_all_reduce_backward,
                                setup_context=_matmul_all_reduce_setup)
