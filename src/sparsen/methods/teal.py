"""TEAL (Liu et al., ICLR 2025): magnitude thresholds on the inputs of all seven block linears.

Uniform allocation: every linear's threshold is the quantile of |input| at the target sparsity on
the calibration tokens, so each linear (and the model) skips the target share of its inputs.
Two passes: the first on dense activations (as TEAL does), the second with the first pass's
thresholds active, so every threshold is set on the inputs the sparse model actually produces
(upstream masks shift downstream activations; one pass undershoots the target).
"""

from __future__ import annotations

from sparsen.methods.calibration import input_histograms
from sparsen.methods.registry import Method, weighted
from sparsen.methods.runtime import InputSparsifier, ThresholdRule


def thresholds(hists, sparsity):
    sites, achieved = {}, {}
    for site, hist in hists.items():
        t = hist.quantile(sparsity)
        sites[site] = {"rule": "threshold", "threshold": t}
        achieved[site] = hist.share_below(t)
    return sites, achieved


def calibrate(lm, sparsity, wins, config, progress):
    sites, achieved = thresholds(input_histograms(lm, wins, progress=progress, desc="calibration pass 1/2"), sparsity)
    if sparsity > 0:
        first = InputSparsifier(lm.adapter, {s: ThresholdRule(e["threshold"]) for s, e in sites.items()})
        hists = input_histograms(lm, wins, progress=progress, desc="calibration pass 2/2", sparsifier=first)
        sites, achieved = thresholds(hists, sparsity)
    return sites, weighted(lm, achieved)


METHOD = Method("teal", "magnitude thresholds on the inputs of all 7 linears (TEAL)", calibrate)
