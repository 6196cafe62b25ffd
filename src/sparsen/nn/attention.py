"""Self-attention with rotary positions, dense or sparse by pattern: [B, T, d_model] -> [B, T, d_model].

Patterns (each query's keys, within the causal window when ``causal``):
- ``dense``: all of them (scaled_dot_product_attention);
- ``topk``: the k highest-scoring keys per query and head, the rest masked before the softmax (Spark's and
  LightSUAN's sparse attention family; a row with fewer than k keys keeps them all);
- ``local-dilated``: the last ``window`` keys plus every ``stride``-th key before them (a fixed pattern).
The kept share of the allowed keys, over the last forward, is ``attended_fraction``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsen.core.config import check, strict_config

PATTERNS = ("dense", "topk", "local-dilated")


@strict_config
class AttentionConfig:
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    """key/value heads (grouped-query attention); None: n_heads"""
    causal: bool = True
    rope_theta: float = 10000.0
    pattern: str = "dense"
    """dense, topk or local-dilated"""
    k: int = 16
    """topk: keys per query"""
    window: int = 16
    """local-dilated: the most recent keys kept"""
    stride: int = 16
    """local-dilated: every stride-th older key kept"""

    def __post_init__(self):
        check(self.n_heads > 0 and self.d_model % self.n_heads == 0, "d_model must be a multiple of n_heads")
        check(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0, "n_heads must be a multiple of n_kv_heads")
        check(self.pattern in PATTERNS, f"pattern must be one of {', '.join(PATTERNS)}")
        check(self.k > 0 and self.window > 0 and self.stride > 0, "k, window and stride must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope_tables(t: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [t, head_dim] in the rotate-half convention (Llama's)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def allowed_keys(cfg: AttentionConfig, t: int) -> torch.Tensor:
    """[t, t] bool: the keys a query may see before any top-k (causal and the fixed pattern)."""
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    ok = (j <= i) if cfg.causal else torch.ones(t, t, dtype=torch.bool)
    if cfg.pattern == "local-dilated":
        dist = (i - j).abs()
        ok = ok & ((dist < cfg.window) | (dist % cfg.stride == 0))
    return ok


class Attention(nn.Module):
    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        hd, kv = cfg.head_dim, cfg.kv_heads
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k = nn.Linear(cfg.d_model, kv * hd, bias=False)
        self.v = nn.Linear(cfg.d_model, kv * hd, bias=False)
        self.o = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.attended_fraction = 1.0
        self._rope = (0, None, None)

    def rope(self, t: int):
        if self._rope[0] < t:
            self._rope = (t, *rope_tables(t, self.cfg.head_dim, self.cfg.rope_theta))
        return self._rope[1][:t], self._rope[2][:t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        b, t, _ = x.shape
        hd = c.head_dim
        q = self.q(x).view(b, t, c.n_heads, hd).transpose(1, 2)
        k = self.k(x).view(b, t, c.kv_heads, hd).transpose(1, 2)
        v = self.v(x).view(b, t, c.kv_heads, hd).transpose(1, 2)
        cos, sin = self.rope(t)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.kv_heads != c.n_heads:
            rep = c.n_heads // c.kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if c.pattern == "dense":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=c.causal)
            self.attended_fraction = 1.0
        else:
            allowed = allowed_keys(c, t)
            scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
            scores = scores.masked_fill(~allowed, float("-inf"))
            keep = allowed.expand_as(scores)
            if c.pattern == "topk" and c.k < t:
                kth = scores.topk(c.k, dim=-1).values[..., -1:]
                keep = keep & (scores >= kth)
                scores = scores.masked_fill(~keep, float("-inf"))
            self.attended_fraction = float(keep.sum() / allowed.sum() / (b * c.n_heads))
            y = torch.softmax(scores, -1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, c.n_heads * hd))
