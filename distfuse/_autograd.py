"""Backward formulas (tensor-parallel semantics).

In a tensor-parallel layer the output of a sum over ranks is replicated, and so
is the gradient that flows back into it: every rank runs backward with its own
output's gradient. W is the group size, r this rank. Hence:
  all_reduce:            forward Σ_s x_s, backward identity (each rank's x_r gets dy);
  matmul_all_reduce:     y = Σ_s a_s @ b_s + bias, so da_r = dy @ b_rᵀ,
                         db_r = a_rᵀ @ dy and dbias = Σ_rows dy, with no communication;
  matmul_reduce_scatter: y_r = rows r of Σ_s a_s @ b_s, so with G = all-gather of the
                         dy_r along rows, da_r = G @ b_rᵀ and db_r = a_rᵀ @ G;
  all_gather_matmul:     y_r = A @ b_r with A = concat_s(a_s), so da_r = rows r of
                         Σ_s dy_s @ b_sᵀ (a reduce-scatter) and db_r = Aᵀ @ dy_r
                         (A gathered again in backward);
  all_reduce_rms_norm:   (y, h) with h = Σ_s x_s + residual, y = rms_norm(h) · weight, so
                         dh = the norm's backward of dy, plus dh from h's own gradient;
                         dx_r = dresidual = dh (the sum's backward is the identity, as
                         for all_reduce), dweight = Σ_rows dy · rms_norm(h) (the same on
                         every rank);
  attention_all_gather:  y_r = attention of q_r over K = concat_s(k_s), V = concat_s(v_s)
                         (sequence dim), so dq_r, dK, dV come from the local attention's
                         backward (recomputed on K, V gathered again), and dk_r, dv_r =
                         rows r (sequence dim) of Σ_s dK_s, Σ_s dV_s (a reduce-scatter).
The backward collectives are torch.distributed._functional_collectives, which run
eagerly and are traced as graph ops when AOTAutograd traces the backward (torch.compile).
"""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from ._reference import local_attention, resolve_group


def _wait(t):
    # Eagerly a functional collective returns an AsyncCollectiveTensor: wait for it, so that
    # no gradient is left as that subclass. Traced, it is a plain tensor already.
    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else t


def _all_gather(x, dim, group_name):
    return _wait(fc.all_gather_tensor(x.contiguous(), dim, group_name))


def _reduce_scatter(x, dim, group_name):
    return _wait(fc.reduce_scatter_tensor(x.contiguous(), "sum", dim, group_name))


def _rank(group_name):
    return dist.get_rank(resolve_group(group_name))


# ---------------------------------------------------------------- all_reduce, matmul_all_reduce

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


# ---------------------------------------------------------------- matmul_reduce_scatter, all_gather_matmul

def _matmul_operands_setup(ctx, inputs, output):
    # a for db, b for da (matmul_reduce_scatter and all_gather_matmul). all_gather_matmul
    # keeps only the local a and gathers A = concat_s(a_s) again in backward: keeping A
    # would hold W times a's memory from forward to backward, and the extra all-gather is
    # the one that Megatron's sequence parallelism pays too.
    a, b, ctx.group_name = inputs
    ctx.a_shape = a.shape
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None,
                          b if ctx.needs_input_grad[0] else None)


def _matmul_reduce_scatter_backward(ctx, grad):
    a, b = ctx.saved_tensors
    g_full = _all_gather(grad, 0, ctx.group_name)  # G = concat_s dy_s: [M, N]
    grad_a = (g_full @ b.t()).reshape(ctx.a_shape) if ctx.needs_input_grad[0] else None  # da = G bᵀ
    grad_b = a.reshape(-1, a.shape[-1]).t() @ g_full if ctx.needs_input_grad[1] else None  # db = aᵀ G
    return grad_a, grad_b, None


# ---------------------------------------------------------------- all_gather_matmul

def _all_gather_matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:  # da_r = rows r of Σ_s dy_s b_sᵀ
        grad_a = _reduce_scatter(grad @ b.t(), 0, ctx.group_name).reshape(ctx.a_shape)
    if ctx.needs_input_grad[1]:  # db_r = Aᵀ dy_r, A = concat_s a_s
        grad_b = _all_gather(a.reshape(-1, a.shape[-1]), 0, ctx.group_name).t() @ grad
    return grad_a, grad_b, None


# ---------------------------------------------------------------- all_reduce_rms_norm

def _all_reduce_rms_norm_setup(ctx, inputs, output):
    ctx.eps = inputs[3]
    ctx.save_for_backward(output[1], inputs[2])  # h and weight


def _all_reduce_rms_norm_backward(ctx, grad_y, grad_h):
    h, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_weight = None
    dh = grad_h
    if grad_y is not None:
        acc_dtype = torch.promote_types(h.dtype, torch.float32)  # as the forward: at least fp32
        hf, gy = h.to(acc_dtype), grad_y.to(acc_dtype)
        rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = hf * rstd
        gn = gy * weight.to(acc_dtype)
        # d(n · w)/dh for n = h·rstd: rstd · (gn - n · mean(gn · n)) over the last dim
        dy_h = (rstd * (gn - normed * (gn * normed).mean(-1, keepdim=True))).to(h.dtype)
        dh = dy_h if dh is None else dy_h + dh
        if needs[2]:  # dweight = Σ_rows dy · n
            grad_weight = (gy * normed).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
    # h = Σ_s x_s + residual: dx_r = dresidual = dh
    return (dh if needs[0] else None), (dh if needs[1] else None), grad_weight, None, None


# ---------------------------------------------------------------- attention_all_gather

def _attention_all_gather_setup(ctx, inputs, keyword_only_inputs, output):
    q, k, v, ctx.group_name = inputs
    ctx.is_causal = keyword_only_inputs.get("is_causal", False)
    ctx.scale = keyword_only_inputs.get("scale", None)
    ctx.save_for_backward(q, k, v)


def _attention_all_gather_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # K, V = concat_s k_s, v_s along the sequence (dim 2), gathered again rather than kept.
    k_all, v_all = _all_gather(k, 2, ctx.group_name), _all_gather(v, 2, ctx.group_name)
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_(n) for t, n in zip((q, k_all, v_all), needs[:3]))
        out = local_attention(q_, k_, v_, _rank(ctx.group_name), ctx.is_causal, ctx.scale)
        wanted = [t for t in (q_, k_, v_) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
    grad_q, grad_k_all, grad_v_all = (next(grads) if n else None for n in needs[:3])
    # dk_r, dv_r = rows r (sequence) of Σ_s dK_s, Σ_s dV_s
    grad_k = _reduce_scatter(grad_k_all, 2, ctx.group_name) if needs[1] else None
    grad_v = _reduce_scatter(grad_v_all, 2, ctx.group_name) if needs[2] else None
    return grad_q, grad_k, grad_v, None


torch.library.register_autograd("distfuse::all_reduce", _all_reduce_backward)
torch.library.register_autograd("distfuse::matmul_all_reduce", _matmul_all_reduce_backward,
                                setup_context=_matmul_all_reduce_setup)
torch.library.register_autograd("distfuse::matmul_reduce_scatter", _matmul_reduce_scatter_backward,
                                setup_context=_matmul_operands_setup)
torch.library.register_autograd("distfuse::all_gather_matmul", _all_gather_matmul_backward,
                                setup_context=_matmul_operands_setup)
torch.library.register_autograd("distfuse::all_reduce_rms_norm", _all_reduce_rms_norm_backward,
                                setup_context=_all_reduce_rms_norm_setup)
torch.library.register_autograd("distfuse::attention_all_gather", _attention_all_gather_backward,
                                setup_context=_attention_all_gather_setup)
