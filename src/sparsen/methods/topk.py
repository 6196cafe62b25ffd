"""Exact per-token top-k on the inputs of all seven block linears (an oracle-style baseline: it sorts)."""

from __future__ import annotations

from sparsen.methods.config import MethodConfig, method_config
from sparsen.methods.registry import Method


@method_config
class TopKConfig(MethodConfig):
    """Exact per-token top-k of |x| on every block-linear input (sorts; no calibration)."""

    method = "topk"
    needs_calibration = False


def calibrate(lm, sparsity, wins, config, progress):
    sites = {site: {"rule": "topk", "sparsity": sparsity} for site, *_ in lm.adapter.linear_sites()}
    return sites, sparsity


METHOD = Method("topk", "exact per-token top-k of |x| on the inputs of all 7 linears; no calibration", TopKConfig,
                calibrate)
