"""distfuse.integrations.transformers: a HuggingFace Llama sharded over the group computes
the logits and the greedy continuation of the full model on every rank (CPU over gloo;
on GPUs over NCCL, where its row-parallel projections run the fused kernels), and bad
groups or models get clear errors. Also: a Llama sharded by transformers' own tensor
parallelism and compiled with the distfuse.compile pass runs the fused op."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from test_ops import assert_close, assert_same_on_all_ranks, expect_error


def _tiny_llama(dtype, device, heads=4, kv_heads=2, bias=False, intermediate=256):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(7)  # the same full model on every rank
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():  # biases start at zero: draw them, so that they count
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def _sharded_llama_body(rank, world, group_name, device_type, dtype):
    import distfuse
    from distfuse.integrations.transformers import tensor_parallel
    from distfuse.nn import ColumnParallelLinear, RowParallelLinear
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    pg = dist.group.WORLD
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3)).to(device)
    for bias in (False, True):
        full = _tiny_llama(dtype, device, bias=bias)
        with torch.no_grad():
            full_logits = full(tokens).logits
            full_continuation = full.generate(tokens, max_new_tokens=6, do_sample=False)
        model = tensor_parallel(_tiny_llama(dtype, device, bias=bias), group_name)
        blocks = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
        assert len(blocks) == 4, f"{len(blocks)} row-parallel projections, expected 2 per layer"
        assert sum(isinstance(m, ColumnParallelLinear) for m in model.modules()) == 10
        q = model.model.layers[0].self_attn.q_proj
        assert tuple(q.weight.shape) == (128 // world, 128), tuple(q.weight.shape)
        with torch.no_grad():
            logits = model(tokens).logits
            what = f"sharded Llama, {dtype}, bias={bias}"
            if device.type == "cuda":
                assert distfuse.last_path("matmul_all_reduce") != "reference", f"{what}: no fused kernel ran"
            assert_close(f"{what}: logits", logits, full_logits.double(), dtype)
            assert_same_on_all_ranks(f"{what}: logits", logits, pg)
            continuation = model.generate(tokens, max_new_tokens=6, do_sample=False)
        if dtype == torch.float32:  # bf16 rounding may flip a near tie between two tokens
            assert torch.equal(continuation, full_continuation), f"{what}: greedy continuation differs"
        assert_same_on_all_ranks(f"{what}: continuation", continuation, pg)

    expect_error(lambda: tensor_parallel(_tiny_llama(dtype, device, heads=4, kv_heads=1), group_name),
                 "num_key_value_heads = 1", f"divisible by the group size {world}", exc=ValueError)
    expect_error(lambda: tensor_parallel(torch.nn.Sequential(torch.nn.Linear(4, 4)), group_name),
                 "no attention", "gated MLP", "Sequential", exc=ValueError)
    expect_error(lambda: tensor_parallel(model, group_name), "LlamaForCausalLM already holds",
                 "applied before", exc=ValueError)


def _uneven_split_body(rank, world, group_name):
    """An intermediate_size the group does not divide: one error naming the first projection
    that cannot split, raised before any module is replaced (the model still runs unsharded)."""
    from distfuse.integrations.transformers import tensor_parallel
    from distfuse.nn import ColumnParallelLinear, RowParallelLinear
    model = _tiny_llama(torch.float32, "cpu", intermediate=2 * 64 + 1)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(tokens).logits
    expect_error(lambda: tensor_parallel(model, group_name), "model.layers.0.mlp.gate_proj",
                 "out_features = 129", f"divisible by the group size {world}", exc=ValueError)
    assert not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules()), \
        "the failed call left distfuse layers in the model"
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before), "the failed call changed the model's logits"


def _transformers_tp_compiled_body(rank, world, group_name, device_type, dtype):
    """A Llama sharded by transformers' own tensor parallelism (DTensor weights), compiled by
    Inductor with the distfuse.compile pass: its row-parallel matmul + all-reduce pairs become
    the fused op (one per o_proj and down_proj), and the output matches the eager model's."""
    import os
    import shutil
    import tempfile

    import distfuse
    from test_compile import _compile_and_run
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    pg = dist.group.WORLD
    path = [tempfile.mkdtemp(prefix="distfuse-test-") if rank == 0 else None]
    if rank == 0:
        _tiny_llama(dtype, "cpu").save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(device.index or 0))
    model = LlamaForCausalLM.from_pretrained(path[0], dtype=dtype,
                                             distributed_config=DistributedConfig(tp_plan="auto")).eval()
    model.to(device)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0], ignore_errors=True)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert hasattr(q, "to_local") and q.to_local().shape[0] * world == q.shape[0], "transformers did not shard"
    from distfuse.integrations.transformers import tensor_parallel
    expect_error(lambda: tensor_parallel(model, group_name), "DTensor", "load the model without tp_plan",
                 exc=ValueError)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        eager = model.model(input_ids=tokens, use_cache=False).last_hidden_state
        rewrites, (compiled,) = _compile_and_run(
            lambda ids: model.model(input_ids=ids, use_cache=False).last_hidden_state, [(tokens,)])
    assert rewrites == 4, f"{rewrites} chains rewritten, expected 4 (o_proj and down_proj of 2 layers)"
    if device.type == "cuda":
        assert distfuse.last_path("matmul_all_reduce") != "reference", "no fused kernel ran"
    assert_close("transformers TP compiled with the pass", compiled, eager.double(), dtype)
    assert_same_on_all_ranks("transformers TP compiled with the pass", compiled, pg)


def test_sharded_llama_on_cpu():
    run_distributed(_sharded_llama_body, 2, args=("cpu", torch.float32))


def test_uneven_split_leaves_model_untouched():
    run_distributed(_uneven_split_body, 2)


@pytest.mark.multigpu
def test_sharded_llama_on_gpus():
    run_distributed(_sharded_llama_body, 2, backend="nccl", args=("cuda", torch.bfloat16))


def test_transformers_tp_compiled_on_cpu():
    run_distributed(_transformers_tp_compiled_body, 2, args=("cpu", torch.bfloat16))


@pytest.mark.multigpu
def test_transformers_tp_compiled_on_gpus():
    run_distributed(_transformers_tp_compiled_body, 2, backend="nccl", args=("cuda", torch.bfloat16))
