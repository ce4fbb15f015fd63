"""Tensor-parallel building blocks: parallel linear layers and the Llama decoder layer."""
from .linear import ColumnParallelLinear, RowParallelLinear
from .llama import LlamaConfig, LlamaDecoderLayer, TPLlamaDecoderLayer

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "LlamaConfig", "LlamaDecoderLayer",
           "TPLlamaDecoderLayer"]
