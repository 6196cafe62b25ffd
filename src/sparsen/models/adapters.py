"""Architecture adapters: the one place that knows where a model's parts live.

Every other layer (measure, methods, evaluation, engine) asks an adapter for blocks, linears, norms,
attention geometry, the rotary tables, the embedding and the lm_head; nothing outside ``models/``
reads a Hugging Face module's attributes. One file per architecture (``llama.py``, ``gemma3.py``),
each registering its adapter class here with ``register_adapter``.

A block has q, k, v, o (attention) and gate, up, down (gated MLP: ``act(gate(x)) * up(x)`` is the input
of down; act is SiLU for Llama, tanh-GELU for Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsen.errors import SparsenError

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")

# Linears that read the same input tensor (they are sparsified by one mask in a kernel).
INPUT_GROUPS = {"attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",)}
GROUP_OF = {name: group for group, names in INPUT_GROUPS.items() for name in names}

# Where Hugging Face's decoder layers keep the seven linears (Llama, Mistral, Qwen2 and Gemma 3 alike).
HF_LINEAR_ATTRS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
                   "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                   "down": ("mlp", "down_proj")}


def hf_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The seven linears of a Hugging Face decoder layer, by our names."""
    return {name: getattr(getattr(layer, a), b) for name, (a, b) in HF_LINEAR_ATTRS.items()}


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


@dataclass
class Block:
    """One transformer block's modules, found by the adapter. Norms a block does not have are None."""

    index: int
    layer: nn.Module
    """the decoder layer itself (re-run alone by the allocations; a change of basis hooks its input)"""
    attn: nn.Module
    mlp: nn.Module
    attn_norm: nn.Module
    """the norm before attention (its output is the q/k/v input)"""
    mlp_norm: nn.Module
    """the norm before the MLP (its output is the gate/up input)"""
    linears: dict[str, nn.Linear]
    attn_out_norm: nn.Module | None = None
    """a norm on the attention output before the residual add (Gemma 3)"""
    mlp_out_norm: nn.Module | None = None
    """a norm on the MLP output before the residual add (Gemma 3)"""
    q_norm: nn.Module | None = None
    """per-head RMSNorm of the queries after q (Gemma 3's QK-norm)"""
    k_norm: nn.Module | None = None
    sliding_window: int | None = None
    """this layer attends to the last ``sliding_window`` positions only (None: every position)"""
    rope: str = "global"
    """which rotary table this layer uses (a key of ``Adapter.rope_tables``)"""


class Adapter:
    """What every architecture adapter provides. Subclasses set ``model_types`` and ``_block``."""

    model_types: tuple[str, ...] = ()
    mlp_activation = "silu"
    norm_offset = 0.0
    """RMSNorm computes x / rms(x) * (offset + weight): 0 for Llama, 1 for Gemma"""
    embed_scale = 1.0
    """the embedding rows are multiplied by this before the first block (Gemma: sqrt(hidden))"""
    rotation_refusal: str | None = None
    """why a residual-stream rotation cannot be folded into this architecture (None: it can)"""
    window_bos = False
    """the model was trained with BOS at the start of every sequence: evaluation and calibration windows start with
    it (Gemma: without it its WikiText-2 perplexity nearly doubles, 40.8 instead of 22.1)"""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.blocks = [self._block(i, layer) for i, layer in enumerate(self._decoder().layers)]

    # --- structure -----------------------------------------------------------------------------
    def _decoder(self) -> nn.Module:
        return self.model.model

    def _block(self, i: int, layer: nn.Module) -> Block:  # pragma: no cover - per architecture
        raise NotImplementedError

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
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def norm_eps(self) -> float:
        return float(getattr(self.config, "rms_norm_eps", 1e-6))

    @property
    def attn_scale(self) -> float:
        """The factor on q.k before the softmax."""
        return self.head_dim ** -0.5

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def final_norm(self) -> nn.Module:
        return self._decoder().norm

    @property
    def embed(self) -> nn.Embedding:
        return self._decoder().embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def activation(self, g: torch.Tensor) -> torch.Tensor:
        """The MLP's gate activation (what CATS and CHESS threshold)."""
        return ACTIVATIONS[self.mlp_activation](g)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel gain a norm multiplies by (its weight, plus the architecture's offset)."""
        return norm.weight.detach() + self.norm_offset

    @torch.no_grad()
    def set_unit_gain(self, norm: nn.Module) -> None:
        """Make a norm's gain 1 (after folding it into the linears that read its output)."""
        norm.weight.fill_(1.0 - self.norm_offset)

    # --- sites -----------------------------------------------------------------------------------
    def linear_sites(self):
        """Yield (site_name, block_index, linear_name, module); site names look like ``layers.3.q``."""
        for b in self.blocks:
            for name in LINEAR_NAMES:
                yield f"layers.{b.index}.{name}", b.index, name, b.linears[name]

    def linear_params(self) -> dict[str, int]:
        return {site: m.weight.numel() for site, _, _, m in self.linear_sites()}

    # --- running -----------------------------------------------------------------------------------
    def trunk(self, tokens, **kwargs):
        """The decoder stack without the lm_head (calibration only needs the block linears' inputs; the
        logits of 1024 positions cost ~20% of a forward pass). No KV cache."""
        return self._decoder()(tokens, use_cache=False, **kwargs)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output: final norm, then lm_head."""
        return self.lm_head(self.final_norm(h))

    @torch.no_grad()
    def rope_tables(self, max_seq: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per rotary kind (``Block.rope``), cos and sin [max_seq, head_dim] (HF's rotate-half convention)."""
        pos = torch.arange(max_seq)[None]
        cos, sin = self._decoder().rotary_emb(torch.zeros(1, 1, self.hidden_size), pos)
        return {"global": (cos[0].float(), sin[0].float())}

    @property
    def attention_implementation(self) -> str:
        """The attention function the model calls (a name in transformers' AttentionInterface)."""
        return self.config._attn_implementation

    @attention_implementation.setter
    def attention_implementation(self, name: str) -> None:
        self.model.set_attn_implementation(name)

    def fingerprint_tensors(self) -> list[torch.Tensor]:
        """Sampled weights that identify the model (with its config): first and last block, embedding rows."""
        first, last = self.blocks[0], self.blocks[-1]
        out = [lin.weight.detach().reshape(-1)[:4096] for b in (first, last) for lin in (b.linears["q"], b.linears["down"])]
        return out + [self.embed.weight.detach()[:4]]


ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an architecture known to ``adapter_for`` (one line per architecture file)."""
    ADAPTERS.append(cls)
    return cls


def supported_model_types() -> tuple[str, ...]:
    _load_builtin()
    return tuple(t for a in ADAPTERS for t in a.model_types)


def _load_builtin() -> None:
    from sparsen.models import gemma3, llama  # noqa: F401  (each registers its adapter)


def adapter_for(model: nn.Module) -> Adapter:
    _load_builtin()
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise SparsenError(
        f"unsupported architecture '{model_type}': sparsen supports {', '.join(supported_model_types())}; "
        "load a model of one of those"
    )
