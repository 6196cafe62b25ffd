"""TEAL (Liu et al., ICLR 2025): magnitude thresholds on the inputs of all seven block linears.

Uniform allocation: every linear's threshold is the quantile of |input| at the target sparsity on
the calibration tokens, so each linear (and the model) skips the target share of its inputs.
Two passes: the first on dense activations (as TEAL does), the second with the first pass's
thresholds active, so every threshold is set on the inputs the sparse model actually produces
(upstream masks shift downstream activations; one pass undershoots the target).
"""

from __future__ import annotations

from sparsen.methods.allocation import ALLOCATIONS, site_levels
from sparsen.methods.calibration import input_histograms
from sparsen.methods.registry import Method, weighted
from sparsen.methods.runtime import InputSparsifier, ThresholdRule

ALLOCATION_WINDOWS = 1  # calibration windows the sensitivity allocation measures KL on


def thresholds(hists, levels: dict[str, float]):
    sites, achieved = {}, {}
    for site, hist in hists.items():
        t = hist.quantile(levels[site])
        sites[site] = {"rule": "threshold", "threshold": t, "target": levels[site]}
        achieved[site] = hist.share_below(t)
    return sites, achieved


def calibrate(lm, sparsity, wins, config, progress):
    hists = input_histograms(lm, wins, progress=progress, desc="calibration pass 1/2")
    levels, record = site_levels(lm, hists, wins[:ALLOCATION_WINDOWS], sparsity, config.allocation, progress)
    sites, achieved = thresholds(hists, levels)
    if sparsity > 0:
        first = InputSparsifier(lm.adapter, {s: ThresholdRule(e["threshold"]) for s, e in sites.items()})
        hists = input_histograms(lm, wins, progress=progress, desc="calibration pass 2/2", sparsifier=first)
        sites, achieved = thresholds(hists, levels)
    return sites, weighted(lm, achieved), {"params": record}


METHOD = Method("teal", "magnitude thresholds on the inputs of all 7 linears (TEAL)", calibrate,
                allocations=ALLOCATIONS)
