"""Llama, Mistral, Qwen2 (and SmolLM2, which is Llama): pre-RMSNorm, SwiGLU MLP, GQA, one rotary table."""

from __future__ import annotations

import torch.nn as nn

from sparsen.models.adapters import Adapter, Block, register_adapter


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    _attr = {
        "q": ("self_attn", "q_proj"),
        "k": ("self_attn", "k_proj"),
        "v": ("self_attn", "v_proj"),
        "o": ("self_attn", "o_proj"),
        "gate": ("mlp", "gate_proj"),
        "up": ("mlp", "up_proj"),
        "down": ("mlp", "down_proj"),
    }

    def _block(self, i: int, layer: nn.Module) -> Block:
        linears = {name: getattr(getattr(layer, a), b) for name, (a, b) in self._attr.items()}
        window = getattr(self.config, "sliding_window", None) if getattr(self.config, "use_sliding_window", False) else None
        return Block(i, layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm, linears,
                     sliding_window=window)
