"""Tensor parallelism for HuggingFace transformers decoder models, on distfuse layers.

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).cuda()
    distfuse.integrations.transformers.tensor_parallel(model, group)   # on every rank

Every attention block (q_proj, k_proj, v_proj -> o_proj) and every gated MLP (gate_proj,
up_proj -> down_proj) is sharded in place over the group, Megatron style: the first
projections become ``distfuse.nn.ColumnParallelLinear`` (this rank's heads and
intermediate features, no communication) and the last one ``RowParallelLinear``, whose
matmul and all-reduce run as one ``distfuse.matmul_all_reduce``. Each rank loads the full
model and keeps its shard. Attention then runs on this rank's heads: the models whose
attention reshapes by head_dim with an inferred head count (Llama, Mistral, Qwen2 and
their kin in transformers 5) need nothing else. Embeddings, norms and the LM head stay
replicated, so the logits are whole on every rank.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..nn.linear import ColumnParallelLinear, RowParallelLinear, resolve_group
from ..ops import GroupLike

__all__ = ["tensor_parallel", "BLOCKS"]

# (column-parallel projections, row-parallel projection) of each block kind.
BLOCKS: Tuple[Tuple[Tuple[str, ...], str], ...] = (
    (("q_proj", "k_proj", "v_proj"), "o_proj"),
    (("gate_proj", "up_proj"), "down_proj"),
)


def _plain_linear(module: nn.Module, name: str) -> bool:
    linear = getattr(module, name, None)
    if not isinstance(linear, nn.Linear):
        return False
    if type(linear.weight.data) is not torch.Tensor:  # a DTensor: sharded by transformers' tp_plan
        raise ValueError(f"distfuse.integrations.transformers: {name}.weight is a "
                         f"{type(linear.weight.data).__name__}: load the model without tp_plan")
    return True


def _check_heads(config, world: int) -> None:
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field, None)
        if heads is not None and heads % world:
            raise ValueError(f"distfuse.integrations.transformers: config.{field} = {heads} must be "
                             f"divisible by the group size {world}: each rank takes whole heads")


def _check_splits(blocks, world: int) -> None:
    # What the loaders divide: a column-parallel layer's out_features, a row-parallel one's in_features.
    bad = [(f"{path}.{name}" if path else name, dim, getattr(getattr(module, name), dim))
           for path, module, columns, row in blocks
           for name, dim in (*((c, "out_features") for c in columns), (row, "in_features"))
           if getattr(getattr(module, name), dim) % world]
    if bad:
        where, dim, value = bad[0]
        more = f" (and {len(bad) - 1} more projections)" if len(bad) > 1 else ""
        raise ValueError(f"distfuse.integrations.transformers: {where}.{dim} = {value} must be divisible by "
                         f"the group size {world}{more}; the model was left unchanged")


def tensor_parallel(model: nn.Module, group: GroupLike = None) -> nn.Module:
    """Shard `model`'s attention and MLP blocks over `group` in place (see the module's
    docstring); call it on every rank with the same model. Returns the model. Raises
    ValueError where the heads do not split evenly, where the model has no such block,
    or where it was sharded before (by this function or by transformers' tp_plan)."""
    _, _, world = resolve_group(group)
    if any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules()):
        raise ValueError(f"distfuse.integrations.transformers: {type(model).__name__} already holds "
                         "distfuse tensor-parallel layers (tensor_parallel was applied before)")
    config = getattr(model, "config", None)
    if config is not None:
        _check_heads(getattr(config, "text_config", config), world)
    # Find every block and check every split before replacing anything: a loader failing
    # midway would leave the model half sharded (and a retry refused as sharded before).
    blocks = [(path, module, columns, row)
              for path, module in model.named_modules() for columns, row in BLOCKS
              if all(_plain_linear(module, name) for name in (*columns, row))]
    _check_splits(blocks, world)
    for _, module, columns, row in blocks:
        for name in columns:
            setattr(module, name, ColumnParallelLinear.from_unsharded(getattr(module, name), group))
        setattr(module, row, RowParallelLinear.from_unsharded(getattr(module, row), group))
    if not blocks:
        raise ValueError("distfuse.integrations.transformers: no attention (q_proj, k_proj, v_proj, o_proj) "
                         "or gated MLP (gate_proj, up_proj, down_proj) block of nn.Linear layers in "
                         f"{type(model).__name__}")
    return model
