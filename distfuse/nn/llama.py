"""Llama decoder layer: a single-device reference and its tensor-parallel form.

The TP layer splits attention heads and MLP columns across the ranks of a group
(Megatron layout): q/k/v and gate/up are column-parallel, o_proj and down_proj
are row-parallel and end in ``distfuse.ops.matmul_all_reduce``; the norms and
the rotary table are replicated. Both layers share one forward, so the TP layer
differs from the reference only in its linear layers and local head counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import GroupLike
from .linear import ColumnParallelLinear, RowParallelLinear, resolve_group


@dataclass
class LlamaConfig:
    """Shape of one Llama decoder layer (the fields of a HuggingFace ``LlamaConfig`` it needs)."""
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0

    def __post_init__(self):
        hq, hkv = self.num_attention_heads, self.num_key_value_heads
        if hq <= 0 or hkv <= 0 or hq % hkv != 0:
            raise ValueError(f"LlamaConfig: num_key_value_heads = {hkv} must be positive and divide "
                             f"num_attention_heads = {hq}")
        if self.head_dim is None:
            if self.hidden_size % hq != 0:
                raise ValueError(f"LlamaConfig: hidden_size = {self.hidden_size} must be divisible by "
                                 f"num_attention_heads = {hq} when head_dim is not given")
            self.head_dim = self.hidden_size // hq
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig: head_dim = {self.head_dim} must be even (rotary embedding)")


class LlamaRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (fp64 for fp64 inputs), cast back to the input dtype once at
    the end (the same rounding as ``distfuse.ops.all_reduce_rms_norm``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos and sin tables [B, S, head_dim] for the given positions (computed in fp32)."""

    def __init__(self, head_dim: int, theta: float, device=None):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        # Not persistent: derived from the config, not a learned weight.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]: both halves share a frequency
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by the angles of cos/sin [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    """Causal GQA self-attention with RoPE.

    ``column`` and ``row`` build the projections (``nn.Linear`` on one device,
    the parallel linears under TP); with ``world`` ranks this module owns
    1/world of the query and key/value heads.
    """

    def __init__(self, config: LlamaConfig, column: Callable[[int, int], nn.Module],
                 row: Callable[[int, int], nn.Module], world: int = 1):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        hq, hkv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d
        self.num_heads, self.num_kv_heads = hq // world, hkv // world
        self.q_proj = column(h, hq * d)
        self.k_proj = column(h, hkv * d)
        self.v_proj = column(h, hkv * d)
        self.o_proj = row(hq * d, h)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, s, self.num_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, d).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # GQA: query head i reads key/value head i // (num_heads / num_kv_heads). The ratio
        # is the same per rank as globally, so a rank's query heads find theirs locally.
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.num_heads * d))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); ``column``/``row`` as in LlamaAttention."""

    def __init__(self, config: LlamaConfig, column: Callable[[int, int], nn.Module],
                 row: Callable[[int, int], nn.Module]):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = column(h, i)
        self.up_proj = column(h, i)
        self.down_proj = row(i, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """One Llama decoder layer on one device (the reference for the TP layer)."""

    def __init__(self, config: LlamaConfig, dtype=None, device=None):
        super().__init__()
        self.config = config
        f = {"dtype": dtype, "device": device}
        column, row, world = self._linear_builders(f)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, **f)
        self.self_attn = LlamaAttention(config, column, row, world)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, **f)
        self.mlp = LlamaMLP(config, column, row)
        self.rotary_emb = LlamaRotaryEmbedding(config.head_dim, config.rope_theta, device=device)

    def _linear_builders(self, factory: dict):
        """(column builder, row builder, world size) for the projections."""
        dense = partial(nn.Linear, bias=False, **factory)
        return dense, dense, 1

    def forward(self, hidden_states: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [B, S, H], position_ids [B, S] (default 0..S-1) -> [B, S, H]."""
        b, s, _ = hidden_states.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=hidden_states.device).unsqueeze(0).expand(b, s)
        cos, sin = self.rotary_emb(position_ids, hidden_states.dtype)
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class TPLlamaDecoderLayer(LlamaDecoderLayer):
    """The decoder layer split over the ranks of ``group``.

    Rank r owns query heads [r·Hq/W, (r+1)·Hq/W), key/value heads
    [r·Hkv/W, (r+1)·Hkv/W) and MLP columns [r·I/W, (r+1)·I/W). Each sublayer
    ends in one row-parallel ``matmul_all_reduce``; every rank returns the full
    output. The forward is the reference layer's; gradients follow
    tensor-parallel semantics (see RowParallelLinear).
    """

    def __init__(self, config: LlamaConfig, group: GroupLike = None, dtype=None, device=None):
        name, _, world = resolve_group(group)
        hq, hkv = config.num_attention_heads, config.num_key_value_heads
        if hq % world != 0 or hkv % world != 0:
            raise ValueError(f"TPLlamaDecoderLayer: num_attention_heads (Hq) = {hq} and num_key_value_heads "
                             f"(Hkv) = {hkv} must both be divisible by the group size {world}")
        if config.intermediate_size % world != 0:
            raise ValueError(f"TPLlamaDecoderLayer: intermediate_size = {config.intermediate_size} must be "
                             f"divisible by the group size {world}")
        # Read by _linear_builders during the base constructor.
        self._tp = (name, world)
        super().__init__(config, dtype=dtype, device=device)

    def _linear_builders(self, factory: dict):
        name, world = self._tp
        column = partial(ColumnParallelLinear, group=name, bias=False, **factory)
        row = partial(RowParallelLinear, group=name, bias=False, **factory)
        return column, row, world

    @classmethod
    def from_unsharded(cls, layer: LlamaDecoderLayer, group: GroupLike = None, *, dtype=None,
                       device=None) -> "TPLlamaDecoderLayer":
        """This rank's shard of an unsharded layer (dtype and device default to the layer's)."""
        ref = layer.input_layernorm.weight
        dtype = ref.dtype if dtype is None else dtype
        device = ref.device if device is None else device
        tp = cls(layer.config, group=group, dtype=dtype, device=device)
        pairs = [(tp.self_attn, layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                 (tp.mlp, layer.mlp, ("gate_proj", "up_proj", "down_proj"))]
        with torch.no_grad():
            for tp_mod, full_mod, names in pairs:
                for name in names:
                    getattr(tp_mod, name).load_unsharded(getattr(full_mod, name))
            tp.input_layernorm.weight.copy_(layer.input_layernorm.weight)
            tp.post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight)
        return tp
