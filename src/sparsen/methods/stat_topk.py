"""Statistical top-k (Spark Transformer; Gemma 3n's gaussian top-k): a per-token threshold from the
token's own statistics, assuming Gaussian entries. Linear time, no sort, no calibration.
"""

from __future__ import annotations

from sparsen.methods.registry import Method


def calibrate(lm, sparsity, wins, config, progress):
    sites = {site: {"rule": "gaussian_topk", "sparsity": sparsity} for site, *_ in lm.adapter.linear_sites()}
    return sites, None  # achieved sparsity depends on how Gaussian the inputs are: measured at eval time


METHOD = Method("stat-topk", "Gaussian per-token threshold rms*Phi^-1((1+s)/2) on all 7 inputs; no calibration",
                calibrate, needs_calibration=False)
