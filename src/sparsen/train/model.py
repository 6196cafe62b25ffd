"""A small pre-LN transformer, readable in one file: a decoder LM, or (``classes`` > 0) the same blocks unmasked with
a mean-pooled classification head. Every block's MLP and attention are sparsen.nn modules chosen by config, so any
module can sit in any block.

Block: x + attn(norm(x)), then x + mlp(norm(x)); LayerNorm; rotary positions; the embedding tied to the output.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsen.core.config import check, config_json, strict_config
from sparsen.nn import MLP_KINDS, PATTERNS, Attention, AttentionConfig, build_mlp
from sparsen.nn.topk import check_k


@strict_config
class LMConfig:
    vocab: int = 256
    """256 for bytes; a BPE vocabulary's size otherwise"""
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ctx: int = 128
    """tokens per training sequence"""
    d_ff: int = 512
    mlp: str = "dense"
    """the MLP kind: dense (non-gated ReLU unless ``activation``/``gated`` say otherwise), topk, stat-topk,
    predictor, blockffn or moe (``experts`` gated experts of width d_ff, ``k`` per token)"""
    activation: str = "relu"
    gated: bool = False
    k: int = 32
    """topk / stat-topk / predictor: units kept per token; moe: experts per token"""
    soft: bool = True
    """stat-topk: soft threshold"""
    r: int = 64
    """predictor: input dimensions that predict"""
    experts: int = 16
    """blockffn, moe: experts"""
    router_l1: float = 0.0
    """blockffn: weight of the router's L1 term"""
    moe_aux: float = 0.0
    """moe: weight of the load-balancing loss"""
    moe_z: float = 0.0
    """moe: weight of the router z-loss"""
    capacity_factor: float | None = None
    """moe: None for dropless, else the capacity factor"""
    gate: str = "softmax"
    """moe: softmax (of logits / temperature) or activation (softmax of tanh(logits))"""
    temperature: float = 1.0
    normalize_topk: bool = True
    sparse_layers: tuple = ()
    """the layers that get ``mlp`` / ``attention`` (empty: all); the others get the dense ReLU MLP and dense attention"""
    attention: str = "dense"
    """dense, topk or local-dilated"""
    attn_k: int = 16
    attn_window: int = 16
    attn_stride: int = 16
    classes: int = 0
    """> 0: a classifier over ``classes`` labels (unmasked attention), not a language model"""
    pool: str = "mean"
    """classifier readout: 'mean' over the positions, or 'cls': a learned token prepended and read out (ViT's)"""

    def __post_init__(self):
        check(self.vocab > 1 and self.d_model > 0 and self.n_layers > 0 and self.ctx > 1 and self.d_ff > 0,
              "vocab, d_model, n_layers, ctx and d_ff must be positive (vocab, ctx > 1)")
        check(self.mlp in MLP_KINDS, f"mlp must be one of {', '.join(MLP_KINDS)}, not '{self.mlp}'")
        check(self.attention in PATTERNS, f"attention must be one of {', '.join(PATTERNS)}, not '{self.attention}'")
        check(self.d_model % self.n_heads == 0, f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}")
        check(all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.sparse_layers),
              f"sparse_layers must be layer indices in 0..{self.n_layers - 1}")
        if self.mlp in ("topk", "stat-topk", "predictor"):
            check_k(self.k, self.d_ff, "k")
        if self.mlp == "moe":
            check_k(self.k, self.experts, "k (experts per token)")
        check(self.classes >= 0, "classes must be >= 0")
        check(self.pool in ("mean", "cls"), f"pool must be 'mean' or 'cls', not '{self.pool}'")

    def mlp_config(self, layer: int):
        kind = self.mlp if (not self.sparse_layers or layer in self.sparse_layers) else "dense"
        cls = MLP_KINDS[kind][0]
        base = {"d_model": self.d_model, "d_ff": self.d_ff}
        if kind == "dense":
            return cls(**base, activation=self.activation, gated=self.gated)
        if kind == "topk":
            return cls(**base, activation=self.activation, gated=self.gated, k=self.k)
        if kind == "stat-topk":
            return cls(**base, activation=self.activation, gated=self.gated, k=self.k, soft=self.soft)
        if kind == "predictor":
            return cls(**base, activation=self.activation, r=self.r, k=self.k)
        if kind == "moe":
            return cls(**base, experts=self.experts, k=self.k, activation=self.activation, aux_coefficient=self.moe_aux,
                       z_coefficient=self.moe_z, capacity_factor=self.capacity_factor, gate=self.gate,
                       temperature=self.temperature, normalize_topk=self.normalize_topk)
        return cls(**base, activation=self.activation, experts=self.experts, router_l1=self.router_l1)

    def attention_config(self, layer: int) -> AttentionConfig:
        sparse = not self.sparse_layers or layer in self.sparse_layers
        return AttentionConfig(d_model=self.d_model, n_heads=self.n_heads, causal=self.classes == 0,
                               pattern=self.attention if sparse else "dense", k=self.attn_k, window=self.attn_window,
                               stride=self.attn_stride)

    def to_json(self) -> dict:
        return config_json(self)

    @classmethod
    def from_json(cls, d: dict) -> LMConfig:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.attention_config(layer))
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = build_mlp(cfg.mlp_config(layer))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.classifier = nn.Linear(cfg.d_model, cfg.classes) if cfg.classes else None
        self.apply(self._init)
        if cfg.classes and cfg.pool == "cls":
            self.cls = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)  # after the others: their init unchanged

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits: [B, T, vocab] for a language model, [B, classes] for a classifier."""
        check(tokens.shape[-1] <= self.cfg.ctx, f"sequences of {tokens.shape[-1]} tokens are longer than ctx "
              f"{self.cfg.ctx}")
        x = self.embed(tokens)
        cls = self.classifier is not None and self.cfg.pool == "cls"
        if cls:
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.classifier is not None:
            return self.classifier(x[:, 0] if cls else x.mean(1))
        return x @ self.embed.weight.T

    def aux_loss(self) -> torch.Tensor:
        """The modules' own loss terms from the last forward (BlockFFN's router L1)."""
        terms = [b.mlp.aux_loss for b in self.blocks if hasattr(b.mlp, "aux_loss")]
        return sum(terms) if terms else torch.zeros(())

    def expert_loads(self) -> list:
        """Per MoE layer, each expert's share of the last forward's assignments and the share dropped by capacity."""
        return [{"load": b.mlp.expert_load().tolist(), "dropped": b.mlp.dropped / max(1, b.mlp.router_logits.shape[0]
                                                                                         * b.mlp.cfg.k)}
                for b in self.blocks if hasattr(b.mlp, "expert_load")]

    def hidden_modules(self) -> list[nn.Module]:
        """Per layer, the identity each MLP passes its hidden activation through (hook it to count nonzeros)."""
        return [b.mlp.hidden_out for b in self.blocks]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
