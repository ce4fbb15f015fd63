"""torch.compile (Inductor) pass: a matmul whose result is all-reduced becomes one
distfuse.matmul_all_reduce.

A row-parallel layer written with plain PyTorch,

    y = torch.matmul(x, w.t())                   # or F.linear(x, w)
    dist.all_reduce(y, group=tp_group)           # or funcol.all_reduce(y, "sum", tp_group)

reaches Inductor's post-grad graph as

    mm(a, b) -> [reshape] -> _c10d_functional.all_reduce(., "sum", group) -> wait_tensor

and the pass rewrites that chain into

    distfuse.matmul_all_reduce(a, b, group) -> [reshape]

so each GEMM tile's all-reduce starts as soon as the tile is written. Row-wise layers on
DTensor weights (transformers' tp_plan) compile to the same chain. Usage:

    import distfuse.compile
    distfuse.compile.install()            # or: with distfuse.compile.installed(): ...
    model = torch.compile(model)

What is rewritten, and what is left as it was:
- only bf16 and fp16 matmuls (the dtypes of the fused kernels) summed by the all-reduce;
  other reductions and dtypes keep Inductor's own lowering;
- only where the matmul's result feeds nothing but the all-reduce (through at most one
  reshape), so no unreduced value is lost;
- not `addmm` (F.linear with a bias): there every rank adds its bias before the sum,
  which the fused op (bias added once) does not do.
The decision depends only on the graph, so ranks that compile the same program take it
alike. Under CUDA graphs (mode="reduce-overhead") size the group's workspace first
(distfuse.init_workspace), since it cannot grow during capture.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.fx
import torch._functorch.config as functorch_config
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._subclasses.fake_tensor import FakeTensorMode

import distfuse  # noqa: F401  (registers torch.ops.distfuse)

__all__ = ["fuse_matmul_all_reduce", "MatmulAllReducePass", "install", "uninstall", "installed",
           "without_compile_caches"]

_aten = torch.ops.aten
_RESHAPES = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _value(node) -> Optional[torch.Tensor]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _only_user(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def _fusable_chain(wait: torch.fx.Node):
    """(mm, reshape or None, all_reduce) when `wait` ends a chain the pass rewrites."""
    if wait.op != "call_function" or wait.target is not torch.ops._c10d_functional.wait_tensor.default:
        return None
    reduce = wait.args[0]
    if (not isinstance(reduce, torch.fx.Node) or
            reduce.target is not torch.ops._c10d_functional.all_reduce.default or
            not _only_user(reduce, wait) or reduce.args[1] != "sum"):
        return None
    source = reduce.args[0]
    if not isinstance(source, torch.fx.Node) or not _only_user(source, reduce):
        return None
    reshape = None
    if source.target in _RESHAPES:
        reshape, source = source, source.args[0]
        if not isinstance(source, torch.fx.Node) or not _only_user(source, reshape):
            return None
    if source.target is not _aten.mm.default:
        return None
    a, b = (_value(x) for x in source.args)
    if a is None or b is None or a.dtype not in _FUSED_DTYPES or b.dtype != a.dtype:
        return None
    return source, reshape, reduce


def fuse_matmul_all_reduce(graph: torch.fx.Graph) -> int:
    """Rewrite every mm -> [reshape] -> all_reduce("sum") -> wait_tensor chain of `graph`
    (see the module's docstring) into distfuse.matmul_all_reduce; returns how many."""
    fused_op = torch.ops.distfuse.matmul_all_reduce.default
    rewrites = 0
    for wait in list(graph.nodes):
        chain = _fusable_chain(wait)
        if chain is None:
            continue
        mm, reshape, reduce = chain
        group_name = reduce.args[2]
        fake_mode = (torch._guards.detect_fake_mode([_value(mm.args[0])]) or
                     FakeTensorMode(allow_non_fake_inputs=True))
        with graph.inserting_before(wait):
            fused = graph.call_function(fused_op, (mm.args[0], mm.args[1], group_name))
            fused.meta.update(mm.meta)
            with fake_mode:  # the fake kernel: the output's shape, dtype and strides
                fused.meta["val"] = fused_op(_value(mm.args[0]), _value(mm.args[1]), group_name)
            out = fused
            if reshape is not None:
                out = graph.call_function(reshape.target, (fused, *reshape.args[1:]), dict(reshape.kwargs))
                out.meta.update(reshape.meta)
        wait.replace_all_uses_with(out)
        for node in (wait, reduce, reshape, mm):
            if node is not None:
                graph.erase_node(node)
        rewrites += 1
    return rewrites


class MatmulAllReducePass(CustomGraphPass):
    """fuse_matmul_all_reduce as an Inductor post-grad pass (config.post_grad_custom_post_pass);
    `rewrites` counts the chains it rewrote over all graphs it saw. `then`: a pass that was
    installed before, run after this one."""

    def __init__(self, then: Optional[CustomGraphPass] = None):
        self.then = then
        self.rewrites = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewrites += fuse_matmul_all_reduce(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        then = self.then.uuid() if self.then is not None else None
        return (get_hash_for_files((__file__,)), then)


def install() -> MatmulAllReducePass:
    """Make every later torch.compile (Inductor) run the pass; a custom post-grad pass that
    was already installed runs after it. Returns the installed pass."""
    current = inductor_config.post_grad_custom_post_pass
    if isinstance(current, MatmulAllReducePass):
        return current
    installed_pass = MatmulAllReducePass(then=current)
    inductor_config.post_grad_custom_post_pass = installed_pass
    return installed_pass


def uninstall() -> None:
    """Undo install(): the pass that was installed before it, if any, stays."""
    current = inductor_config.post_grad_custom_post_pass
    if isinstance(current, MatmulAllReducePass):
        inductor_config.post_grad_custom_post_pass = current.then


@contextlib.contextmanager
def installed() -> Iterator[MatmulAllReducePass]:
    """install() for the duration of the block (compilation happens at a compiled
    function's first call, so make that call inside it)."""
    was_installed = isinstance(inductor_config.post_grad_custom_post_pass, MatmulAllReducePass)
    pass_ = install()
    try:
        yield pass_
    finally:
        if not was_installed:
            uninstall()


@contextlib.contextmanager
def without_compile_caches() -> Iterator[None]:
    """Compile every graph afresh (Inductor's FX-graph caches and AOTAutograd's off): a graph
    served from a cache went through the pass when it was first compiled and is not seen
    again, so MatmulAllReducePass.rewrites counts only graphs compiled in such a block."""
    with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        yield
