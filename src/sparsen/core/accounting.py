"""Accounting: how many weight bytes a plan lets a kernel skip, and how many it adds, per site kind.

Per site, the share of its inputs zeroed on the sparse positions; weighted by the weights each site governs
that is the share of those bytes a kernel skips. A method may add weights read per token (a change of basis,
a low-rank term): they are charged against the skipped share, giving the *effective* sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    """Zeros and entries seen per site since the last reset."""

    zeros: dict[str, int] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)

    def add(self, site: str, zeros: int, entries: int) -> None:
        self.zeros[site] = self.zeros.get(site, 0) + zeros
        self.entries[site] = self.entries.get(site, 0) + entries

    def share(self, site: str) -> float:
        n = self.entries.get(site, 0)
        return self.zeros.get(site, 0) / n if n else 0.0


def achieved(sites: dict, tally: Tally, added_params: int) -> dict:
    """Achieved sparsity: overall (effective, after the charge), skipped (before it), per site, per layer, per
    part (linear name), and per site kind {params, skipped, added}. Sites without a rule count as dense (0).
    ``sites``: name -> ``Site``; the share of every kind is relative to all sites' weights. Sites that govern no
    weights (attention) are accounted by ``core/attention.AttnTally`` instead."""
    sites = {s: site for s, site in sites.items() if site.params > 0}
    per_site = {s: tally.share(s) for s in sites}
    total = sum(site.params for site in sites.values())
    skipped = sum(per_site[s] * site.params for s, site in sites.items()) / total
    per_layer: dict[int, list[float]] = {}
    per_part: dict[str, list[float]] = {}
    by_kind: dict[str, dict] = {}
    for s, site in sites.items():
        for table, key in ((per_layer, site.layer), (per_part, site.part)):
            acc = table.setdefault(key, [0.0, 0])
            acc[0] += per_site[s] * site.params
            acc[1] += site.params
        k = by_kind.setdefault(site.kind.value, {"params": 0, "skipped_params": 0.0})
        k["params"] += site.params
        k["skipped_params"] += per_site[s] * site.params
    kinds = {kind: {"params": v["params"], "skipped": v["skipped_params"] / v["params"] if v["params"] else 0.0}
             for kind, v in by_kind.items()}
    return {"overall": skipped - added_params / total, "skipped": skipped, "added_share": added_params / total,
            "per_layer": [per_layer[i][0] / per_layer[i][1] for i in sorted(per_layer)],
            "per_linear": {n: v[0] / v[1] for n, v in per_part.items()}, "per_site": per_site,
            "by_kind": kinds, "added_params": added_params}
