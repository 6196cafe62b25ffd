"""Statistical top-k (Spark Transformer; Gemma 3n's gaussian top-k): a per-token threshold from the
token's own statistics, assuming Gaussian entries. Linear time, no sort, no calibration.
"""

from __future__ import annotations

from sparsen.methods.config import MethodConfig, method_config
from sparsen.methods.registry import Method


@method_config
class StatTopKConfig(MethodConfig):
    """Statistical top-k: keep |x| > rms(x) * Phi^-1((1 + s) / 2) per token; no calibration, exact for Gaussian rows."""

    method = "stat-topk"
    needs_calibration = False


def calibrate(lm, sparsity, wins, config, progress):
    sites = {site: {"rule": "gaussian_topk", "sparsity": sparsity} for site, *_ in lm.adapter.linear_sites()}
    return sites, None  # achieved sparsity depends on how Gaussian the inputs are: measured at eval time


METHOD = Method("stat-topk", "Gaussian per-token threshold rms*Phi^-1((1+s)/2) on all 7 inputs; no calibration",
                StatTopKConfig, calibrate)
