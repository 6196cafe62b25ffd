"""TEAL (Liu et al., ICLR 2025): magnitude thresholds on the inputs of all seven block linears.

Uniform allocation: every linear's threshold is the quantile of |input| at the target sparsity on
the calibration tokens, so each linear (and the model) skips the target share of its inputs.
"""

from __future__ import annotations

from sparsen.methods.calibration import input_histograms
from sparsen.methods.registry import Method, weighted


def calibrate(lm, sparsity, wins, config, progress):
    hists = input_histograms(lm, wins, progress=progress, desc="teal calibration")
    sites, achieved = {}, {}
    for site, hist in hists.items():
        t = hist.quantile(sparsity)
        sites[site] = {"rule": "threshold", "threshold": t}
        achieved[site] = hist.share_below(t)
    return sites, weighted(lm, achieved)


METHOD = Method("teal", "magnitude thresholds on the inputs of all 7 linears (TEAL)", calibrate)
