"""Gemma 3 (text decoder, e.g. the bundled Gemma 3 270M): a Llama-shaped block with four norms and QK-norm.

What differs from Llama, and where the adapter says so:
- RMSNorm multiplies by (1 + weight) (``norm_offset``); the embedding rows are scaled by sqrt(hidden)
  (``embed_scale``); the MLP gate is tanh-GELU, not SiLU (``mlp_activation``);
- the attention and MLP outputs pass a norm before the residual add (``Block.attn_out_norm`` /
  ``mlp_out_norm``), and q and k are RMS-normed per head before the rotary (``q_norm`` / ``k_norm``);
- scores are scaled by query_pre_attn_scalar ** -0.5 (``attn_scale``), which need not be head_dim;
- 5 of 6 layers attend to a sliding window with their own rotary base ("local"), the rest to every
  position ("global") (``Block.sliding_window``, ``Block.rope``, ``rope_tables``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sparsen.errors import SparsenError
from sparsen.models.adapters import Adapter, Block, hf_linears, register_adapter

# HF layer_types entry -> our rotary-table key
_ROPE_OF = {"sliding_attention": "local", "full_attention": "global"}
_LAYER_TYPE_OF = {v: k for k, v in _ROPE_OF.items()}


@register_adapter
class Gemma3Adapter(Adapter):
    # "gemma3" alone is the multimodal Gemma3ForConditionalGeneration (decoder under model.language_model, config
    # under text_config): not mapped here.
    model_types = ("gemma3_text",)
    mlp_activation = "gelu_tanh"
    norm_offset = 1.0
    window_bos = True
    rotation_refusal = ("its post-attention and post-feedforward RMSNorms sit on the branch outputs before the residual "
                        "add, so a rotation of the residual stream cannot be folded through them")

    def __init__(self, model: nn.Module):
        act = getattr(model.config, "hidden_activation", None)
        if act != "gelu_pytorch_tanh":  # ACTIVATIONS["gelu_tanh"] is that one; any other would be measured wrongly
            raise SparsenError(f"Gemma 3 model with MLP activation '{act}': sparsen supports 'gelu_pytorch_tanh' only")
        if getattr(model.config, "attn_logit_softcapping", None) is not None:
            raise SparsenError("Gemma model with attention-logit softcapping (Gemma 2 style): sparsen does not model it; "
                               "load a Gemma 3 checkpoint")
        super().__init__(model)
        # What the embedding module multiplies by: sqrt(hidden) rounded to the weights' dtype (25.25 in bf16, not
        # 25.298), so a re-implementation matches the model bit for bit.
        self.embed_scale = float(self.embed.embed_scale.to(self.embed.weight.dtype))

    def _block(self, i: int, layer: nn.Module) -> Block:
        linears = hf_linears(layer)
        layer_type = self.config.layer_types[i]
        if layer_type not in _ROPE_OF:
            raise SparsenError(f"Gemma 3 layer {i} has attention type '{layer_type}': sparsen knows "
                               f"{', '.join(_ROPE_OF)} only")
        sliding = layer_type == "sliding_attention"
        attn = layer.self_attn
        return Block(i, layer, attn, layer.mlp, layer.input_layernorm, layer.pre_feedforward_layernorm, linears,
                     attn_out_norm=layer.post_attention_layernorm, mlp_out_norm=layer.post_feedforward_layernorm,
                     q_norm=attn.q_norm, k_norm=attn.k_norm,
                     sliding_window=self.config.sliding_window if sliding else None, rope=_ROPE_OF[layer_type])

    @property
    def attn_scale(self) -> float:
        return float(self.config.query_pre_attn_scalar) ** -0.5

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.final_norm(h))
        cap = getattr(self.config, "final_logit_softcapping", None)  # None for Gemma 3; Gemma 2 style configs cap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def rope_tables(self, max_seq: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        dec = self._decoder()
        x = torch.zeros(1, 1, self.hidden_size, dtype=self.embed.weight.dtype)
        pos = torch.arange(max_seq)[None]
        out = {}
        for kind, layer_type in _LAYER_TYPE_OF.items():
            if hasattr(dec, "rotary_emb_local"):  # transformers < 5: one module per kind
                cos, sin = (dec.rotary_emb_local if kind == "local" else dec.rotary_emb)(x, pos)
            else:  # one module, the kind passed as layer_type
                cos, sin = dec.rotary_emb(x, pos, layer_type)
            out[kind] = (cos[0].float(), sin[0].float())
        return out
