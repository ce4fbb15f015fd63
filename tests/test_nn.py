"""distfuse.nn: the parallel linear layers and the tensor-parallel Llama decoder layer.

Each spawned run costs a few seconds per rank, so one body runs many checks.
Weights and inputs come from the same seed on every rank: every rank builds the
same unsharded reference in its own process and compares its TP output with it.

Forwards run under torch.no_grad() here; tests/test_autograd.py checks the gradients
on CPU, and the GPU test below also runs one backward over NCCL.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_harness import run_distributed

# fp32 TP vs unsharded: the same products summed in another order (W partial GEMMs
# plus an all-reduce instead of one long dot product). With O(1) activations and
# reductions over <= 128 terms the difference is ~1e-6; 1e-4 leaves a wide margin
# yet catches any real bug (a wrong shard, a bias added twice, a head mixed up),
# which moves outputs by > 1e-2.
FP32_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _one_thread():
    # W ranks share a CI machine's few cores: one intra-op thread per rank keeps
    # W x (threads per rank) from oversubscribing them.
    torch.set_num_threads(1)


def _gather(t):
    """Every rank's copy of t (test-side helper; plain torch.distributed)."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _assert_same_on_all_ranks(t):
    for r, other in enumerate(_gather(t)):
        assert torch.equal(other, t), f"output differs between this rank and rank {r}"


# ---------------------------------------------------------------- parallel linear layers

def _linear_body(rank, world, group_name):
    from distfuse.nn import ColumnParallelLinear, RowParallelLinear
    from distfuse.ops import all_reduce

    _one_thread()
    in_f, out_f = 40, 24
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.bias.normal_()  # O(1) bias: adding it twice (or never) cannot hide in the tolerance
    lin_nobias = nn.Linear(in_f, out_f, bias=False)
    k, n = in_f // world, out_f // world
    cols, rows = slice(rank * k, (rank + 1) * k), slice(rank * n, (rank + 1) * n)
    tol = {"rtol": 1e-5, "atol": 1e-5}

    # Constructors: shard shapes, zero biases, every way to name the group.
    for group in (group_name, dist.group.WORLD, None):
        col = ColumnParallelLinear(in_f, out_f, group=group)
        assert col.weight.shape == (n, in_f) and col.bias.shape == (n,) and not col.bias.any()
        row = RowParallelLinear(in_f, out_f, group=group, dtype=torch.float64)
        assert row.weight.shape == (out_f, k) and row.bias.shape == (out_f,)
        assert row.weight.dtype == torch.float64
    assert ColumnParallelLinear(in_f, out_f, group_name, bias=False).bias is None

    with torch.no_grad():
        # 3-D non-contiguous input, and a 2-D input (a flat batch of tokens).
        for x in (torch.randn(5, 2, in_f).transpose(0, 1), torch.randn(3, in_f)):
            full = lin(x)

            # Row-parallel, reduced: the sum over ranks with the bias added once.
            row = RowParallelLinear.from_unsharded(lin, group_name)
            assert row.weight.shape == (out_f, k)
            y = row(x[..., cols])
            torch.testing.assert_close(y, full, **tol)
            _assert_same_on_all_ranks(y)
            row_nb = RowParallelLinear.from_unsharded(lin_nobias, group_name)
            torch.testing.assert_close(row_nb(x[..., cols]), lin_nobias(x), **tol)

            # Row-parallel, full input: the layer takes its own slice.
            row_full = RowParallelLinear.from_unsharded(lin, group_name, input_is_parallel=False)
            torch.testing.assert_close(row_full(x), full, **tol)

            # Row-parallel partials: x_r @ w_rᵀ, bias on rank 0 only; they sum to the full result.
            for parallel_input in (True, False):
                row_p = RowParallelLinear.from_unsharded(lin, group_name, reduce_results=False,
                                                         input_is_parallel=parallel_input)
                partial = row_p(x[..., cols] if parallel_input else x)
                expected = x[..., cols] @ lin.weight[:, cols].t() + (lin.bias if rank == 0 else 0)
                torch.testing.assert_close(partial, expected, **tol)
                torch.testing.assert_close(all_reduce(partial, group_name), full, **tol)

            # Column-parallel: this rank's slice of the output features, or all of them.
            col = ColumnParallelLinear.from_unsharded(lin, group_name)
            assert col.weight.shape == (n, in_f)
            torch.testing.assert_close(col(x), full[..., rows], **tol)
            col_g = ColumnParallelLinear.from_unsharded(lin, group_name, gather_output=True)
            y = col_g(x)
            torch.testing.assert_close(y, full, **tol)
            _assert_same_on_all_ranks(y)
            col_nb = ColumnParallelLinear.from_unsharded(lin_nobias, group_name, gather_output=True)
            torch.testing.assert_close(col_nb(x), lin_nobias(x), **tol)

    with torch.no_grad():
        # A 1-D input (one token), as nn.Linear takes it.
        x = torch.randn(in_f)
        row = RowParallelLinear.from_unsharded(lin, group_name)
        torch.testing.assert_close(row(x[cols]), lin(x), **tol)
        # torch.autocast with fp32 weights: the layer computes in the autocast dtype, as
        # nn.Linear does (the op's operands cast, not refused).
        x = torch.randn(3, in_f)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, y = lin(x), row(x[..., cols])
        assert y.dtype == expected.dtype == torch.bfloat16, (y.dtype, expected.dtype)
        torch.testing.assert_close(y.float(), lin(x), rtol=3e-2, atol=5e-2)

    # Clear errors: an uneven split names the argument and the values; a shape mismatch on load.
    if world > 1:
        with pytest.raises(ValueError, match=rf"out_features = {world + 1} must be divisible by the "
                                             rf"group size {world}"):
            ColumnParallelLinear(in_f, world + 1, group_name)
        with pytest.raises(ValueError, match=rf"in_features = {world + 1} must be divisible by the "
                                             rf"group size {world}"):
            RowParallelLinear(world + 1, out_f, group_name)
    with pytest.raises(ValueError, match="cannot load an nn.Linear"):
        RowParallelLinear(in_f, out_f, group_name).load_unsharded(nn.Linear(in_f, out_f + world))


# ---------------------------------------------------------------- Llama decoder layer

def _reference_layer(config, seed):
    """The unsharded layer, identical on every rank (same seed), with non-trivial norm weights."""
    from distfuse.nn import LlamaDecoderLayer
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(config)
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return layer.eval()


def _inputs(hidden, seed, device="cpu", dtype=torch.float32):
    """(hidden_states, position_ids) cases: prefill with an odd length, one decode token at
    position 9, and a batch with its own position offsets."""
    g = torch.Generator().manual_seed(seed)
    x = lambda *s: torch.randn(*s, hidden, generator=g).to(device, dtype)  # noqa: E731
    offsets = torch.tensor([[0], [5], [11]])
    return [(x(2, 7), None),
            (x(2, 1), torch.full((2, 1), 9, device=device)),
            (x(3, 13), (offsets + torch.arange(13)).to(device))]


def _llama_body(rank, world, group_name, check_compile):
    from distfuse.nn import ColumnParallelLinear, LlamaConfig, TPLlamaDecoderLayer

    _one_thread()
    configs = [
        # GQA (2 query heads per key/value head), head_dim = hidden / heads = 8.
        LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4),
        # Multi-head attention with an explicit head_dim != hidden / heads.
        LlamaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                    head_dim=12, rope_theta=10000.0),
    ]
    for i, config in enumerate(configs):
        ref = _reference_layer(config, seed=100 + i)
        tp = TPLlamaDecoderLayer.from_unsharded(ref, group_name).eval()
        attn = tp.self_attn
        assert attn.num_heads == config.num_attention_heads // world
        assert attn.num_kv_heads == config.num_key_value_heads // world
        assert attn.q_proj.weight.shape == (config.num_attention_heads * config.head_dim // world,
                                            config.hidden_size)
        assert attn.o_proj.weight.shape == (config.hidden_size,
                                            config.num_attention_heads * config.head_dim // world)
        assert tp.mlp.down_proj.weight.shape == (config.hidden_size, config.intermediate_size // world)

        with torch.no_grad():
            for x, pos in _inputs(config.hidden_size, seed=200 + i):
                y = tp(x, pos)
                assert y.shape == x.shape
                torch.testing.assert_close(y, ref(x, pos), **FP32_TOL)
                _assert_same_on_all_ranks(y)

    if check_compile:
        # One graph for the whole layer (the distfuse op and its fake kernel trace; no graph
        # break), and it matches eager. aot_eager runs the same aten ops, so the tolerance is tight.
        compiled = torch.compile(tp, fullgraph=True, backend="aot_eager")
        col = ColumnParallelLinear(config.hidden_size, 8 * world, group_name, gather_output=True)
        compiled_col = torch.compile(col, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            for x, pos in _inputs(config.hidden_size, seed=300):
                torch.testing.assert_close(compiled(x, pos), tp(x, pos))
                torch.testing.assert_close(compiled_col(x), col(x))

    # Bad configs (W > 1): the error names what does not divide.
    if world == 1:
        return
    hidden = 16 * world
    with pytest.raises(ValueError, match=rf"num_attention_heads \(Hq\) = {2 * world} and num_key_value_heads "
                                         rf"\(Hkv\) = 1 must both be divisible by the group size {world}"):
        TPLlamaDecoderLayer(LlamaConfig(hidden, 8 * world, 2 * world, 1), group_name)
    with pytest.raises(ValueError, match=rf"Hq\) = 3 and .*\(Hkv\) = 3 must both be divisible"):
        TPLlamaDecoderLayer(LlamaConfig(48, 8 * world, 3, 3), group_name)
    with pytest.raises(ValueError, match=rf"intermediate_size = {8 * world + 1} must be divisible"):
        TPLlamaDecoderLayer(LlamaConfig(hidden, 8 * world + 1, world, world), group_name)


def _blocks_body(rank, world, group_name, check_compile):
    _linear_body(rank, world, group_name)
    _llama_body(rank, world, group_name, check_compile)


@pytest.mark.parametrize("world,check_compile", [(1, False), (2, True), (4, False)],
                         ids=["w1", "w2+compile", "w4"])
def test_tp_blocks(world, check_compile):
    """Parallel linears vs nn.Linear, then the TP layer vs the unsharded layer (fp32, gloo);
    at W=2 also torch.compile(fullgraph=True). One spawn per world size: spawning dominates."""
    run_distributed(_blocks_body, world, args=(check_compile,))


def test_llama_config_errors():
    from distfuse.nn import LlamaConfig
    assert LlamaConfig(64, 128, 8, 2).head_dim == 8
    with pytest.raises(ValueError, match="hidden_size = 60 must be divisible by num_attention_heads = 8"):
        LlamaConfig(60, 128, 8, 2)
    with pytest.raises(ValueError, match="num_key_value_heads = 3 must be positive and divide "
                                         "num_attention_heads = 8"):
        LlamaConfig(64, 128, 8, 3)
    with pytest.raises(ValueError, match="head_dim = 7 must be even"):
        LlamaConfig(64, 128, 8, 2, head_dim=7)


def test_reference_layer_basics():
    """The single-device reference: causal (a token ignores later ones), and position_ids=None
    means 0..S-1."""
    from distfuse.nn import LlamaConfig
    layer = _reference_layer(LlamaConfig(32, 64, 4, 2), seed=0)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, layer(x, torch.arange(7).expand(2, 7)), rtol=0, atol=0)
        x2 = x.clone()
        x2[:, 4:] += 1.0
        torch.testing.assert_close(layer(x2)[:, :4], y[:, :4])
        assert not torch.allclose(layer(x2)[:, 4:], y[:, 4:])
        # Shifting every position by the same offset leaves attention unchanged (RoPE is relative).
        torch.testing.assert_close(layer(x, torch.arange(7).expand(2, 7) + 100), y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- GPU: NCCL, bf16

def _llama_gpu_body(rank, world, group_name):
    import copy

    from distfuse.nn import LlamaConfig, TPLlamaDecoderLayer

    device = torch.device("cuda", torch.cuda.current_device())
    # Llama-3-like proportions, scaled down: GQA with 4 query heads per key/value head.
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=64)
    ref = _reference_layer(config, seed=7).to(device)  # built on CPU: the same weights on every rank
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    tp = TPLlamaDecoderLayer.from_unsharded(ref, group_name, dtype=torch.bfloat16).eval()
    assert tp.self_attn.q_proj.weight.dtype == torch.bfloat16

    with torch.no_grad():
        for x, pos in _inputs(config.hidden_size, seed=8, device=device, dtype=torch.bfloat16):
            expected = ref(x.float(), pos)  # fp32 on the same GPU, from the same bf16 input
            y = tp(x, pos)
            assert y.dtype == torch.bfloat16 and y.shape == x.shape
            _assert_same_on_all_ranks(y)
            # bf16 keeps 8 significant bits: outputs of magnitude ~1-4 round by up to ~1e-2,
            # and the layer rounds several intermediates. The TP error must stay of the order
            # of the unsharded bf16 layer's own error (partials rounded before the sum may add
            # a little), and below an absolute bound.
            err = (y.float() - expected).abs()
            base = (ref_bf16(x, pos).float() - expected).abs()
            torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)
            assert err.mean() <= 2 * base.mean() + 2e-3, (err.mean().item(), base.mean().item())

    # Backward over NCCL (the column layers' input gradients are summed over the ranks):
    # the input's and the replicated norms' gradients, against fp32, within a small
    # multiple of the unsharded bf16 layer's own error.
    x, pos = _inputs(config.hidden_size, seed=9, device=device, dtype=torch.bfloat16)[0]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(10)).to(device)
    grads = {}
    for name, layer, dtype in (("fp32", ref, torch.float32), ("bf16", ref_bf16, torch.bfloat16),
                               ("tp", tp, torch.bfloat16)):
        layer.zero_grad()
        xi = x.to(dtype).detach().clone().requires_grad_()
        layer(xi, pos).backward(upstream.to(dtype))
        grads[name] = [xi.grad.float(), layer.input_layernorm.weight.grad.float(),
                       layer.post_attention_layernorm.weight.grad.float()]
    for what, got, bf16, fp32 in zip(("input", "input_layernorm", "post_attention_layernorm"),
                                     grads["tp"], grads["bf16"], grads["fp32"]):
        err, base = (got - fp32).abs().mean().item(), (bf16 - fp32).abs().mean().item()
        assert err <= 2 * base + 2e-3 * fp32.abs().mean().item(), (what, err, base)


@pytest.mark.multigpu
def test_tp_llama_layer_nccl_bf16():
    world = min(4, torch.cuda.device_count())
    run_distributed(_llama_gpu_body, world, backend="nccl")
