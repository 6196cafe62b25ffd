"""MInference's vertical-slash pattern (Jiang et al., NeurIPS 2024): the last queries' attention picks key columns
(vertical lines) and diagonals (slash lines) that every query then reads.

As the reference codes it (``vertical_and_slash_kernel``): softmax of the last ``last_q`` queries (64) over every
key (causal); vertical score of a key = its probability summed over those queries, the first ``sink`` columns forced
(30); slash score of a diagonal (query - key = o) = the probabilities summed along it, the last ``local`` diagonals
forced (30); keep the top columns and the top diagonals. The reference takes per-head (v, s) counts from an offline
search on one example (e.g. 1000 and 6096 of 128K); here they are budgets: ``density`` of the context split into
columns (``vertical_share``) and diagonals, e.g. at 4K and 1/8: 256 columns and 256 diagonals (at least ``sink``
and ``local``). Shared selection sums the probabilities over the KV head's query heads.

Execution: the columns stay token-level (the kernel reads each kept column for every query block after it, as
MInference's 1 x 64 column tiles do); a diagonal keeps every aligned B x B block it crosses (MInference uses 64-wide
tiles at the diagonal's own offset, so an aligned block costs up to twice as much per diagonal). The density
reported counts what is computed. Estimate: the last queries' scores, last_q L d per head (about 2 last_q / L of
the dense QK^T).
"""

from __future__ import annotations

import math

import torch

from sparsen.core.attention import BlockSelector
from sparsen.core.prefill import PrefillPattern, block_sizes, diagonal_sums, n_blocks, rank_desc
from sparsen.methods.attention.base import AttentionMethod, PrefillConfig, _number, _whole, attention_config, check


@attention_config
class VerticalSlashConfig(PrefillConfig):
    """Top key columns and diagonals from the last queries' attention."""

    method = "vertical-slash"

    density: float | None = 0.125
    """share of the context, in (0, 1], kept as columns and diagonals together (split by ``vertical_share``; the
    computed density differs: a column or diagonal covers the queries after it, and diagonals are computed per block)"""
    vertical_share: float = 0.5
    """share of the budget given to columns (the rest to diagonals)"""
    last_q: int = 64
    """the last queries whose attention chooses (MInference 64, Sparse Frontier 256)"""
    sink: int = 30
    """first columns always kept (MInference 30, Sparse Frontier 4)"""
    local: int = 30
    """nearest diagonals always kept (MInference 30, Sparse Frontier 64)"""

    def __post_init__(self):
        super().__post_init__()
        check(_number(self.vertical_share) and 0 <= self.vertical_share <= 1,
              f"vertical_share {self.vertical_share!r}: give a share in [0, 1]")
        for name in ("last_q", "sink", "local"):
            v = getattr(self, name)
            check(_whole(v, 1 if name == "last_q" else 0), f"{name} {v!r}: give a whole number"
                                                            f"{', 1 or more' if name == 'last_q' else ', 0 or more'}")


def last_query_probs(q: torch.Tensor, k: torch.Tensor, scale: float, last: int) -> torch.Tensor:
    """Causal softmax of the last ``last`` queries over every key: q [n_kv, g, n, d] -> [n_kv, g, last, n]."""
    n = k.shape[1]
    qpos = torch.arange(n - last, n)
    s = torch.einsum("hgmd,hkd->hgmk", q[:, :, n - last:], k) * scale
    return torch.softmax(s.masked_fill(torch.arange(n)[None, :] > qpos[:, None], -math.inf), dim=-1)


def slash_blocks(offsets: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """offsets bool [h, n] (kept diagonals query - key = o) -> bool [h, nb, nb]: the blocks they cross."""
    nb = n_blocks(n, block)
    rows = block_sizes(n, block)
    start = torch.arange(nb) * block
    cs = torch.cat([torch.zeros(offsets.shape[0], 1, dtype=torch.long), offsets.long().cumsum(-1)], dim=-1)
    # query block qb spans [a, a + R), key block kb [c, c + K): the block meets offsets [a - c - K + 1, a + R - 1 - c]
    lo = (start[:, None] - start[None, :] - rows[None, :] + 1).clamp(0, n)
    hi = (start[:, None] + rows[:, None] - 1 - start[None, :]).clamp(-1, n - 1)
    count = cs[:, (hi + 1).clamp_min(0)] - cs[:, torch.minimum(lo, hi + 1)]
    return count > 0


class VerticalSlash(BlockSelector):
    def __init__(self, config: VerticalSlashConfig):
        self.shared, self.block, self.last_q = config.shared, config.block, config.last_q
        self.sink, self.local = config.sink, config.local
        self.n_vertical = float(config.density) * float(config.vertical_share)
        self.n_slash = float(config.density) * (1 - float(config.vertical_share))

    def counts(self, n: int) -> tuple[int, int]:
        """Columns and diagonals kept at context n."""
        v = min(n, max(math.ceil(self.n_vertical * n - 1e-9), self.sink))
        s = min(n, max(math.ceil(self.n_slash * n - 1e-9), self.local))
        return v, s

    def blocks(self, q, k, scale):
        n = k.shape[1]
        last = min(self.last_q, n)
        p = last_query_probs(q, k, scale, last)
        p = p.sum(1) if self.shared else p.flatten(0, 1)  # [h, last, n]
        nv, ns = self.counts(n)
        vertical = p.sum(-2)
        vertical[:, : self.sink] = math.inf
        slash = diagonal_sums(p, n - last)
        slash[:, : self.local] = math.inf
        columns = rank_desc(vertical) < nv
        offsets = rank_desc(slash) < ns
        return PrefillPattern(slash_blocks(offsets, n, self.block), self.block, columns)

    def estimate_flops(self, n, d, n_heads, n_kv):
        last = min(self.last_q, n)
        return 2.0 * d * (last * n - last * (last - 1) / 2) * n_heads


METHOD = AttentionMethod("vertical-slash", "block-sparse prefill: MInference's top columns and diagonals from the "
                         "last queries", VerticalSlashConfig, lambda c, layer, ad, t: VerticalSlash(c))
