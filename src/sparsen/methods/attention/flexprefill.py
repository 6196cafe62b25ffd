"""FlexPrefill (Lai et al., ICLR 2025): per head, a query-aware block pattern or a vertical-slash one, each sized to
cover a share gamma of the attention mass.

As the reference codes it (``get_active_blocks``), per head: the last ``last_q`` queries (128) attend to every key
(causal softmax). Their true distribution over key blocks (probabilities averaged over the queries, summed per
block) is compared with an estimate from pooled vectors: softmax(mean of those queries . block-mean keys * scale).
If sqrt(JS divergence) (natural log) is below ``tau`` the head is query-aware: softmax(block-mean q . block-mean
k * scale) over the causal blocks, flattened over the whole head, keeps the fewest block pairs holding gamma of its
mass. Otherwise vertical-slash: the fewest columns (and, apart, diagonals) holding gamma of the last queries' mass
give a count c, and the top c // B + 1 key blocks by block-summed column mass (and block diagonals by
block-summed diagonal mass) are kept, every query block reading them; the counts are clamped to
[min_budget, max_budget] (the reference divides the token counts by a hard-coded 128; we divide by our block).

Budgets at our lengths: the reference's min_budget is 1024 tokens (README 512) on 32K-128K prompts; here
``min_budget`` is a share of the context (1/32: 1024 of 32K, 128 tokens at 4K). The reference also runs prompts
up to max(256, min_budget) dense: we do not (short prompts are one or a few blocks anyway). Shared selection
averages the distributions over the KV head's query heads (the reference selects per query head). Estimate: the
last queries' scores (last_q L d per head), pooling, and the pooled block scores.
"""

from __future__ import annotations

import math

import torch

from sparsen.core.attention import BlockSelector
from sparsen.core.prefill import block_causal, cover_count, diagonal_sums, mean_pool, n_blocks
from sparsen.methods.attention.base import AttentionMethod, PrefillConfig, _number, _whole, attention_config, check
from sparsen.methods.attention.vertical_slash import last_query_probs


@attention_config
class FlexPrefillConfig(PrefillConfig):
    """Per head: query-aware blocks or vertical-slash blocks, covering a share gamma of the mass."""

    method = "flexprefill"
    budgeted = False
    mass_field = "gamma"

    density: float | None = None
    gamma: float = 0.9
    """share of the attention mass the kept blocks cover, in (0, 1] (reference 0.9-0.95)"""
    tau: float = 0.1
    """a head whose sqrt(JS divergence) between estimated and true block distributions is below tau is query-aware"""
    last_q: int = 128
    """the last queries that estimate the pattern (reference: one block of 128)"""
    min_budget: float = 0.03125
    """vertical-slash heads keep at least this share of the context as column blocks, and as diagonal blocks"""
    max_budget: float = 1.0
    """and at most this share"""

    def __post_init__(self):
        super().__post_init__()
        check(_number(self.gamma) and 0 < self.gamma <= 1, f"gamma {self.gamma!r} is outside (0, 1]: give the share "
                                                           "of the attention mass to cover")
        check(_number(self.tau) and self.tau >= 0, f"tau {self.tau!r}: give a divergence threshold, 0 or more")
        check(_whole(self.last_q, 1), f"last_q {self.last_q!r}: give a whole number, 1 or more")
        check(_number(self.min_budget) and _number(self.max_budget) and 0 <= self.min_budget <= self.max_budget <= 1,
              f"min_budget {self.min_budget!r}, max_budget {self.max_budget!r}: give shares with 0 <= min <= max <= 1")


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) between distributions along dim -1."""
    m = (p + q) / 2

    def kl(a):
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - m.clamp_min(1e-30).log()), 0.0).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0).sqrt()


def block_sum(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum over each block of the last dim: [..., n] -> [..., nb]."""
    n = x.shape[-1]
    nb = n_blocks(n, block)
    return torch.nn.functional.pad(x, (0, nb * block - n)).reshape(*x.shape[:-1], nb, block).sum(-1)


class FlexPrefill(BlockSelector):
    def __init__(self, config: FlexPrefillConfig):
        self.shared, self.block, self.last_q = config.shared, config.block, config.last_q
        self.gamma, self.tau = float(config.gamma), float(config.tau)
        self.min_budget, self.max_budget = float(config.min_budget), float(config.max_budget)
        self.query_aware: torch.Tensor | None = None  # [heads] of the last prefill (for inspection)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[n_kv, g, ...] -> [n_kv (mean over the group) or n_heads, ...]"""
        return x.mean(1) if self.shared else x.flatten(0, 1)

    def blocks(self, q, k, scale):
        B = self.block
        n = k.shape[1]
        nb = n_blocks(n, B)
        last = min(self.last_q, n)
        p = self._heads(last_query_probs(q, k, scale, last))  # [h, last, n]
        vertical = p.mean(-2)
        slash = diagonal_sums(p, n - last) / last
        kp = mean_pool(k, B)  # [n_kv, nb, d]
        # the pooled estimate of the last queries' block distribution, against the true one
        est = torch.softmax(torch.einsum("hgd,hkd->hgk", q[:, :, n - last:].mean(2), kp) * scale, dim=-1)
        self.query_aware = js_distance(block_sum(vertical, B), self._heads(est)) < self.tau
        # query-aware: the fewest block pairs holding gamma of the pooled map's mass (rows sum to 1: / nb)
        causal = block_causal(nb)
        pooled = torch.einsum("hgqd,hkd->hgqk", mean_pool(q, B), kp) * scale
        pooled = self._heads(torch.softmax(pooled.masked_fill(~causal, -math.inf), dim=-1)).flatten(1) / nb
        order = pooled.sort(dim=-1, descending=True, stable=True).indices
        take = torch.arange(nb * nb)[None, :] < cover_count(pooled, self.gamma)[:, None]
        aware = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, order, take).reshape(-1, nb, nb)
        # vertical-slash: block counts from the token counts covering gamma, clamped, then the top blocks
        lo = max(1, math.ceil(self.min_budget * n / B - 1e-9))
        hi = max(lo, math.ceil(self.max_budget * n / B - 1e-9))
        n_v = (cover_count(vertical, self.gamma) // B + 1).clamp(lo, hi)
        n_s = (cover_count(slash, self.gamma) // B + 1).clamp(lo, hi)
        top_v = _top(block_sum(vertical, B), n_v)  # [h, nb] key blocks
        top_s = _top(block_sum(slash, B), n_s)  # [h, nb] block diagonals qb - kb
        i = torch.arange(nb)
        diag = (i[:, None] - i[None, :]).clamp_min(0)
        vs = top_v[:, None, :] | top_s[:, diag]
        return torch.where(self.query_aware[:, None, None], aware, vs) & causal

    def estimate_flops(self, n, d, n_heads, n_kv):
        last = min(self.last_q, n)
        nb = n_blocks(n, self.block)
        return (2.0 * d * (last * n - last * (last - 1) / 2) * n_heads + (n_heads + n_kv) * n * d
                + 2.0 * d * (nb * (nb + 1) / 2 + nb) * n_heads)


def _top(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """values [h, m], count [h]: each row's ``count`` largest (ties by position)."""
    order = values.sort(dim=-1, descending=True, stable=True).indices
    take = torch.arange(values.shape[-1])[None, :] < count[:, None]
    return torch.zeros_like(values, dtype=torch.bool).scatter_(-1, order, take)


METHOD = AttentionMethod("flexprefill", "block-sparse prefill: per head query-aware or vertical-slash blocks "
                         "covering a mass gamma", FlexPrefillConfig, lambda c, layer, ad, t: FlexPrefill(c))
