"""Exact per-token top-k on the inputs of all seven block linears (an oracle-style baseline: it sorts)."""

from __future__ import annotations

from sparsen.methods.registry import Method


def calibrate(lm, sparsity, wins, config, progress):
    sites = {site: {"rule": "topk", "sparsity": sparsity} for site, *_ in lm.adapter.linear_sites()}
    return sites, sparsity


METHOD = Method("topk", "exact per-token top-k of |x| on the inputs of all 7 linears; no calibration", calibrate,
                needs_calibration=False)
