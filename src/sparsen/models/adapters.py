"""Architecture adapters: where the seven block linears of a model live.

A block has q, k, v, o (attention) and gate, up, down (SwiGLU MLP). The MLP intermediate is the
input of down: ``silu(gate(x)) * up(x)``. Every later layer (measurement, methods, engine) asks
the adapter for these modules instead of knowing attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from sparsen.errors import SparsenError

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")

# Linears that read the same input tensor (they are sparsified by one mask in a kernel).
INPUT_GROUPS = {"attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",)}
GROUP_OF = {name: group for group, names in INPUT_GROUPS.items() for name in names}


@dataclass
class Block:
    """One transformer block's modules, found by the adapter."""

    index: int
    attn: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    post_attn_norm: nn.Module
    linears: dict[str, nn.Linear]


class LlamaFamilyAdapter:
    """Llama, Mistral, Qwen2 (and SmolLM2, which is Llama): pre-RMSNorm, SwiGLU, GQA."""

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

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.blocks = [self._block(i, layer) for i, layer in enumerate(model.model.layers)]

    def _block(self, i: int, layer: nn.Module) -> Block:
        linears = {name: getattr(getattr(layer, a), b) for name, (a, b) in self._attr.items()}
        return Block(i, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm, linears)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def linear_sites(self):
        """Yield (site_name, block_index, linear_name, module); site names look like ``layers.3.q``."""
        for b in self.blocks:
            for name in LINEAR_NAMES:
                yield f"layers.{b.index}.{name}", b.index, name, b.linears[name]

    def linear_params(self) -> dict[str, int]:
        return {site: m.weight.numel() for site, _, _, m in self.linear_sites()}

    def trunk(self, tokens, **kwargs):
        """The decoder stack without the lm_head (calibration only needs the block linears' inputs; the
        logits of 1024 positions cost ~20% of a forward pass). No KV cache."""
        return self.model.model(tokens, use_cache=False, **kwargs)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def embed(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head


ADAPTERS = [LlamaFamilyAdapter]
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> LlamaFamilyAdapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise SparsenError(
        f"unsupported architecture '{model_type}': sparsen supports {', '.join(SUPPORTED_MODEL_TYPES)} "
        "(Llama-family decoder models); pass one of those"
    )
