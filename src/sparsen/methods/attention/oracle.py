"""Oracle selection (sparse-attention-hub's OracleTopK / OracleTopP): exact scores, so a ceiling, not a saving.

``oracle-topk`` keeps each query's budget of keys with the most attention probability; ``oracle-topp`` the
smallest set holding a share ``p`` of it (sort, cumulative sum, cut). Shared selection sums the probabilities over
the KV head's query heads (top-p: their mean, so the mass is a share again). The estimate reads every key.
"""

from __future__ import annotations

import torch

from sparsen.core.attention import KVSelector, budget_tokens, outside_to_ninf, top_budget
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, _number, attention_config, check


@attention_config
class OracleTopKConfig(AttentionConfig):
    """Exact top-k keys per query by attention probability."""

    method = "oracle-topk"


@attention_config
class OracleTopPConfig(AttentionConfig):
    """The fewest keys holding a share p of the attention probability, per query."""

    method = "oracle-topp"
    budgeted = False

    p: float = 0.9
    """share of the attention mass the kept keys hold, in (0, 1]"""
    density: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check(_number(self.p) and 0 < self.p <= 1,
              f"p {self.p!r} is outside (0, 1]: give the share of the attention mass to keep")

    def _budget_label(self) -> str:
        return f"{self.method}@p{self.p:g}"

    def _changed(self, budget=("density", "tokens", "p")) -> dict:
        return super()._changed(budget)


class OracleTopK(KVSelector):
    def __init__(self, config: OracleTopKConfig):
        self.shared, self.budget = config.shared, config.budget

    def keep(self, q, k, qpos, scores):
        probs = torch.softmax(scores, dim=-1)
        mass = probs.sum(1, keepdim=True) if self.shared else probs
        mass = outside_to_ninf(mass, scores)
        return top_budget(mass, budget_tokens(qpos + 1, **self.budget))

    def estimate_reads(self, n_keys):
        return n_keys.double()


class OracleTopP(KVSelector):
    def __init__(self, config: OracleTopPConfig):
        self.shared, self.p = config.shared, float(config.p)

    def keep(self, q, k, qpos, scores):
        probs = torch.softmax(scores, dim=-1)
        mass = probs.mean(1, keepdim=True) if self.shared else probs
        s = mass.sort(dim=-1, descending=True).values
        count = (s.cumsum(-1) < self.p - 1e-6).sum(-1, keepdim=True) + 1  # keys until the mass reaches p
        thr = s.gather(-1, (count - 1).clamp_max(s.shape[-1] - 1))
        return (mass >= thr) & (mass > 0)

    def estimate_reads(self, n_keys):
        return n_keys.double()


METHOD_TOPK = AttentionMethod("oracle-topk", "exact top-k keys per query (a ceiling)", OracleTopKConfig,
                              lambda c, layer, ad, t: OracleTopK(c))
METHOD_TOPP = AttentionMethod("oracle-topp", "exact top-p attention mass per query (a ceiling)", OracleTopPConfig,
                              lambda c, layer, ad, t: OracleTopP(c))
