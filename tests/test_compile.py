"""The torch.compile pass (distfuse/compile.py): which chains it rewrites and which it
leaves, and that compiled programs still compute what they computed before: on CPU over
torch's fake group (collectives do nothing) and over gloo (real sums, against a float64
oracle), and on GPUs over NCCL, where the rewritten program must run the fused kernels."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from dist_harness import run_distributed
from test_ops import assert_close, assert_same_on_all_ranks


def _linear_all_reduce(x, w, group):
    """A row-parallel linear layer as plain PyTorch writes it: F.linear, in-place all_reduce."""
    y = F.linear(x, w)
    dist.all_reduce(y, group=group)
    return y


def _compile_and_run(fn, calls, dynamic=False):
    """fn compiled by Inductor with the pass installed, run on each argument tuple of
    `calls`; returns (chains rewritten, outputs). Compiled graphs are not taken from
    Inductor's caches, which would skip the pass and its count."""
    import distfuse.compile
    torch._dynamo.reset()
    with distfuse.compile.installed() as fusion, distfuse.compile.without_compile_caches():
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        outs = [compiled(*args) for args in calls]
    torch._dynamo.reset()
    return fusion.rewrites, outs


def _rand(gen, *shape, dtype=torch.bfloat16, device="cpu"):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _fake_group_body(rank, world, group_name):
    import distfuse.compile
    from torch._inductor import config as inductor_config
    pg = dist.group.WORLD
    gen = torch.Generator().manual_seed(11)
    x, w = _rand(gen, 2, 5, 16), _rand(gen, 24, 16)

    def assert_rewrites(what, fn, args, expected, exact=True, dynamic=False):
        calls = args if isinstance(args, list) else [args]
        rewrites, outs = _compile_and_run(fn, calls, dynamic)
        assert rewrites == expected, f"{what}: {rewrites} chains rewritten, expected {expected}"
        for call, out in zip(calls, outs):
            eager = fn(*call)  # the fake group's all-reduce returns its input
            for o, e in zip(*(t if isinstance(t, tuple) else (t,) for t in (out, eager))):
                if exact:
                    assert torch.equal(o, e), f"{what}: compiled output differs from eager"
                else:
                    assert_close(what, o, e, e.dtype)

    # Rewritten: F.linear + in-place all_reduce on a 3-D input (reshapes around the mm),
    # a functional all_reduce of a row-major B in fp16, and two layers in one graph.
    assert_rewrites("linear + dist.all_reduce", lambda a, b: _linear_all_reduce(a, b, pg), (x, w), 1)
    assert_rewrites("matmul + funcol.all_reduce, fp16",
                    lambda a, b: funcol.all_reduce(a @ b, "sum", pg) * 2,
                    (x[0].half(), w.t().contiguous().half()), 1)

    def two_layers(a, wo, wu, wd):
        h = a + _linear_all_reduce(a, wo, pg)
        return h + _linear_all_reduce(F.silu(F.linear(h, wu)), wd, pg)
    layer_args = (_rand(gen, 3, 16), _rand(gen, 16, 16), _rand(gen, 32, 16), _rand(gen, 16, 32))
    assert_rewrites("two row-parallel layers", two_layers, layer_args, 2, exact=False)
    # Dynamic M: one graph for M = 3 and 7.
    assert_rewrites("dynamic M", lambda a, b: _linear_all_reduce(a, b, pg),
                    [(_rand(gen, 3, 16), w), (_rand(gen, 7, 16), w)], 1, dynamic=True)

    # Left as they were: dtypes without fused kernels, other reductions, a matmul whose
    # unreduced value is used too, a bias added before the sum, a sum of more than a matmul.
    assert_rewrites("float32", lambda a, b: _linear_all_reduce(a, b, pg), (x.float(), w.float()), 0)
    assert_rewrites("max", lambda a, b: funcol.all_reduce(a @ b.t(), "max", pg), (x, w), 0)

    def also_unreduced(a, b):
        y = a @ b.t()
        return funcol.all_reduce(y, "sum", pg), y
    assert_rewrites("matmul used unreduced too", also_unreduced, (x[0], w), 0)
    bias = _rand(gen, 24)
    assert_rewrites("linear with bias",
                    lambda a, b, c: funcol.all_reduce(F.linear(a, b, c), "sum", pg), (x[0], w, bias), 0)
    assert_rewrites("matmul + 1", lambda a, b: funcol.all_reduce(a @ b.t() + 1, "sum", pg), (x[0], w), 0)

    # install() keeps a custom pass that was there: it runs after this one, on the
    # rewritten graph, and uninstall() leaves it in place.
    class Recorder(torch._inductor.custom_graph_pass.CustomGraphPass):
        graphs = []

        def __call__(self, graph):
            self.graphs.append(str(graph))

        def uuid(self):
            return "recorder"

    recorder = Recorder()
    previous = inductor_config.post_grad_custom_post_pass
    inductor_config.post_grad_custom_post_pass = recorder
    try:
        assert_rewrites("with another pass", lambda a, b: _linear_all_reduce(a, b, pg), (x, w), 1)
        assert recorder.graphs and "distfuse.matmul_all_reduce" in recorder.graphs[-1], recorder.graphs
        assert inductor_config.post_grad_custom_post_pass is recorder
    finally:
        inductor_config.post_grad_custom_post_pass = previous


def _real_sums_body(rank, world, group_name, device_type, dtypes):
    """Compiled F.linear + dist.all_reduce against the eager fused op (bitwise: the same op
    on the same operands) and the float64 oracle; replicated bitwise across ranks. On
    CUDA: the fused kernels ran, and the same under CUDA graphs (mode="reduce-overhead")."""
    import distfuse
    pg = dist.group.WORLD
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    k, n = 64, 256  # K_r, N: multiples of 8, as the fused kernels need

    def operands(seed, m, dtype):
        """This rank's x [2, m, K_r] and w [N, K_r], and every rank's in float64."""
        every = []
        for r in range(world):
            gen = torch.Generator().manual_seed(seed * 100 + r)
            every.append((_rand(gen, 2, m, k, dtype=dtype), _rand(gen, n, k, dtype=dtype)))
        oracle = sum(xr.double() @ wr.double().t() for xr, wr in every)
        x, w = every[rank]
        return x.to(device), w.to(device), oracle

    def fn(a, b):
        return _linear_all_reduce(a, b, pg)

    def eager_fused(x, w):
        return distfuse.matmul_all_reduce(x.reshape(-1, k), w.t(), pg).reshape(*x.shape[:-1], n)

    for dtype in dtypes:
        calls = [operands(seed, m, dtype) for seed, m in ((1, 3), (2, 61))]
        rewrites, outs = _compile_and_run(fn, [(x, w) for x, w, _ in calls], dynamic=True)
        assert rewrites == 1, f"{dtype}: {rewrites} chains rewritten, expected 1"
        for (x, w, oracle), out in zip(calls, outs):
            what = f"compiled linear + all_reduce, {dtype}, M = {x.shape[1]}"
            if device.type == "cuda":
                assert distfuse.last_path("matmul_all_reduce") != "reference", \
                    f"{what}: ran the reference path, not a fused kernel"
            assert torch.equal(out, eager_fused(x, w)), f"{what}: differs from the eager fused op"
            assert_close(what, out.cpu(), oracle, dtype)
            assert_same_on_all_ranks(what, out, pg)

    if device.type != "cuda":
        return
    # CUDA graphs: the workspace sized before capture; inputs rewritten between replays.
    distfuse.init_workspace(pg)
    dtype = dtypes[0]
    x, w, _ = operands(3, 32, dtype)
    torch._dynamo.reset()
    import distfuse.compile
    with distfuse.compile.installed() as fusion, distfuse.compile.without_compile_caches():
        compiled = torch.compile(fn, fullgraph=True, mode="reduce-overhead")
        for seed in (4, 5, 6):
            x_new, w_new, oracle = operands(seed, 32, dtype)
            x.copy_(x_new)
            w.copy_(w_new)
            out = compiled(x, w).clone()
            what = f"compiled under CUDA graphs, call with seed {seed}"
            assert torch.equal(out, eager_fused(x, w)), f"{what}: differs from the eager fused op"
            assert_close(what, out.cpu(), oracle, dtype)
    assert fusion.rewrites == 1, f"CUDA graphs: {fusion.rewrites} chains rewritten, expected 1"
    torch._dynamo.reset()


def _llama_layer_body(rank, world, group_name, device_type, dtype):
    """A TP Llama decoder layer whose row-parallel projections are written the unfused way
    (F.linear + dist.all_reduce): compiled with the pass, both (o_proj, down_proj) become
    the fused op, and the layer's output matches the eager layer's with the fused op."""
    from distfuse.bench.decoder_layer import set_fused
    from distfuse.nn.llama import LlamaConfig, TPLlamaDecoderLayer
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=16)
    torch.manual_seed(100 + rank)
    with torch.no_grad():
        layer = TPLlamaDecoderLayer(config, group=group_name, dtype=dtype, device=device).eval()
        x = _rand(torch.Generator().manual_seed(5), 2, 7, 128, dtype=dtype, device=device)  # replicated
        fused_eager = layer(x)
        set_fused(layer, False)
        unfused_eager = layer(x)
        rewrites, (compiled_out,) = _compile_and_run(layer, [(x,)])
    assert rewrites == 2, f"TP Llama layer: {rewrites} chains rewritten, expected 2 (o_proj, down_proj)"
    assert_close("compiled layer vs eager fused layer", compiled_out, fused_eager.double(), dtype)
    assert_close("compiled layer vs eager unfused layer", compiled_out, unfused_eager.double(), dtype)
    assert_same_on_all_ranks("compiled layer", compiled_out, dist.group.WORLD)


def test_pass_on_fake_group():
    run_distributed(_fake_group_body, 4, backend="fake")


def test_compiled_sums_on_cpu():
    run_distributed(_real_sums_body, 2, args=("cpu", (torch.bfloat16,)))


def test_compiled_llama_layer_on_cpu():
    run_distributed(_llama_layer_body, 2, args=("cpu", torch.bfloat16))


@pytest.mark.multigpu
def test_compiled_sums_on_gpus():
    run_distributed(_real_sums_body, 2, backend="nccl", args=("cuda", (torch.bfloat16, torch.float16)))


@pytest.mark.multigpu
def test_compiled_llama_layer_on_gpus():
    run_distributed(_llama_layer_body, 2, backend="nccl", args=("cuda", torch.bfloat16))
