"""Llama, Mistral, Qwen2 (and SmolLM2, which is Llama): pre-RMSNorm, SwiGLU MLP, GQA, one rotary table."""

from __future__ import annotations

import torch.nn as nn

from sparsen.models.adapters import Adapter, Block, hf_linears, register_adapter


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")

    def _block(self, i: int, layer: nn.Module) -> Block:
        linears = hf_linears(layer)
        window = getattr(self.config, "sliding_window", None) if getattr(self.config, "use_sliding_window", False) else None
        return Block(i, layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm, linears,
                     sliding_window=window)
