"""Quest (Tang et al., ICML 2024): pages of keys, each summarised by its per-channel min and max; a query reads the
pages whose upper bound on q.k is largest.

As the reference codes it: page score = sum_d max(q_d min_d, q_d max_d) (an upper bound on q.k for any key of the
page); the page holding the query (still filling) is always read; at least ``min_pages`` pages. Shared selection
sums the bounds over the KV head's query heads (Sparse Frontier's ``share_pages``). The budget is rounded up to
whole pages. Estimate: the two summary vectors of every complete page (2/16 of the K reads at pages of 16).
"""

from __future__ import annotations

import torch

from sparsen.core.attention import KVSelector, budget_tokens, group_sum, top_budget
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, _whole, attention_config, check


@attention_config
class QuestConfig(AttentionConfig):
    """Query-aware page selection from per-page key bounds."""

    method = "quest"

    page_size: int = 16
    """keys per page (Quest: 16)"""
    min_pages: int = 3
    """pages read at least, the current one included (Quest: 3)"""

    def __post_init__(self):
        super().__post_init__()
        check(_whole(self.page_size, 1), f"page_size {self.page_size!r}: give a whole number, 1 or more")
        check(_whole(self.min_pages, 1), f"min_pages {self.min_pages!r}: give a whole number, 1 or more")


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of every complete page: k [n_kv, n, d] -> two [n_kv, n // page, d]."""
    n_pages = k.shape[1] // page
    pages = k[:, : n_pages * page].reshape(k.shape[0], n_pages, page, k.shape[2])
    return pages.amin(2), pages.amax(2)


def upper_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """sum_d max(q_d min_d, q_d max_d): q [n_kv, g, n, d], bounds [n_kv, P, d] -> [n_kv, g, n, P]."""
    return (torch.einsum("hgnd,hpd->hgnp", q.clamp_min(0), kmax)
            + torch.einsum("hgnd,hpd->hgnp", q.clamp_max(0), kmin))


class Quest(KVSelector):
    def __init__(self, config: QuestConfig):
        self.shared, self.budget = config.shared, config.budget
        self.page, self.min_pages = config.page_size, config.min_pages

    def keep(self, q, k, qpos, scores):
        page = self.page
        kmin, kmax = page_bounds(k, page)
        ub = group_sum(upper_bounds(q, kmin, kmax), self.shared)  # [n_kv, g', n, P]
        current = qpos // page  # pages before it are complete
        P = ub.shape[-1]
        complete = torch.arange(P)[None, :] < current[:, None]
        ub = ub.masked_fill(~complete, -torch.inf)
        pages = torch.ceil(budget_tokens(qpos + 1, **self.budget) / page).long().clamp_min(self.min_pages)
        n_complete = current.clamp_max(P)
        chosen = top_budget(ub, torch.minimum(pages - 1, n_complete)) & (pages > 1)[:, None]
        chosen = chosen & (n_complete > 0)[:, None]
        j = torch.arange(k.shape[1])
        by_page = chosen.repeat_interleave(page, dim=-1)
        keep = torch.zeros(*ub.shape[:-1], k.shape[1], dtype=torch.bool)
        keep[..., : by_page.shape[-1]] = by_page
        return keep | ((j[None, :] // page) == current[:, None])

    def estimate_reads(self, n_keys):
        return 2.0 * ((n_keys - 1) // self.page).double()


METHOD = AttentionMethod("quest", "Quest: top pages by per-channel min/max key bounds", QuestConfig,
                         lambda c, layer, ad, t: Quest(c))
