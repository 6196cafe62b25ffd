"""H2O (Zhang et al., NeurIPS 2023): heavy hitters by accumulated attention mass, plus a recent window; an evicted
key never returns.

Per sequence: every key's mass accumulates over the queries that read it (the dense prompt's included). At each
sparse query the new key enters; while more keys are held than the budget, the held key outside the recent
window with the least accumulated mass is evicted. The budget splits into ``recent_share`` recent keys and heavy
hitters (the reference: 10% heavy + 10% recent). Shared selection accumulates the mass summed over the KV head's
query heads (H2O was written for one query head per KV head). No estimate reads: the mass comes from the
attention the query computes anyway.
"""

from __future__ import annotations

import math

import torch

from sparsen.core.attention import KVSelector, budget_tokens
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, _number, attention_config, check


@attention_config
class H2OConfig(AttentionConfig):
    """Heavy-hitter keys by accumulated attention mass, and a recent window."""

    method = "h2o"

    recent_share: float = 0.5
    """share of the budget given to the most recent keys (the rest to heavy hitters)"""

    def __post_init__(self):
        super().__post_init__()
        check(_number(self.recent_share) and 0 <= self.recent_share <= 1,
              f"recent_share {self.recent_share!r}: give a share in [0, 1]")


class H2O(KVSelector):
    needs_prefix_mass = True

    def __init__(self, config: H2OConfig):
        self.shared, self.budget, self.recent_share = config.shared, config.budget, float(config.recent_share)
        self.reset()

    def reset(self):
        self.mass = None  # [heads', keys]
        self.held = None

    def _grow(self, heads: int, n: int) -> None:
        if self.mass is None:
            self.mass, self.held = torch.zeros(heads, n, dtype=torch.float64), torch.ones(heads, n, dtype=torch.bool)
        elif self.mass.shape[1] < n:
            extra = n - self.mass.shape[1]
            self.mass = torch.cat([self.mass, torch.zeros(heads, extra, dtype=torch.float64)], 1)
            self.held = torch.cat([self.held, torch.ones(heads, extra, dtype=torch.bool)], 1)

    def observe_prefix(self, mass):
        self._grow(mass.shape[0], mass.shape[1])
        self.mass[:, : mass.shape[1]] += mass.double()

    def keep(self, q, k, qpos, scores):
        n_kv, g, m, nk = scores.shape
        heads = n_kv if self.shared else n_kv * g
        budgets = budget_tokens(qpos + 1, **self.budget)
        out = torch.zeros(n_kv, 1 if self.shared else g, m, nk, dtype=torch.bool)
        for i in range(m):
            n = int(qpos[i]) + 1
            self._grow(heads, n)
            held = self.held[:, :n]
            b = int(budgets[i])
            recent = min(b, math.ceil(self.recent_share * b))
            if int(held[0].sum()) > b:  # every head holds the same number of keys
                old = held.clone()
                old[:, n - recent:] = False
                heavy = b - recent
                mass = self.mass[:, :n].masked_fill(~old, -torch.inf)
                top = torch.zeros_like(old)
                if heavy > 0:
                    top.scatter_(1, mass.topk(heavy, dim=1).indices, True)
                held = top & old
                held[:, n - recent:] = True
                self.held[:, :n] = held
                self.held[:, n:] = True
            row = held.view(n_kv, -1, n)
            out[:, :, i, :n] = row
            s = scores[:, :, i, :n].masked_fill(~row, -torch.inf)
            probs = torch.softmax(s, dim=-1)  # what this query reads; its mass accumulates
            probs = probs.sum(1) if self.shared else probs.reshape(heads, n)
            self.mass[:, :n] += probs.double()
        return out


METHOD = AttentionMethod("h2o", "H2O: heavy hitters by accumulated attention mass and a recent window", H2OConfig,
                         lambda c, layer, ad, t: H2O(c))
