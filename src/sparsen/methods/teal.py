"""TEAL (Liu et al., ICLR 2025): magnitude thresholds on the inputs of all seven block linears.

Uniform allocation: every linear's threshold is the quantile of |input| at the target sparsity on
the calibration tokens, so each linear (and the model) skips the target share of its inputs.
Two passes: the first on dense activations (as TEAL does), the second with the first pass's
thresholds active, so every threshold is set on the inputs the sparse model actually produces
(upstream masks shift downstream activations; one pass undershoots the target).

``criterion_thresholds`` is shared with WINA and the rotation methods: they threshold
|x_i| * scale_i (a per-channel weight norm) instead of |x_i|, stored as per-channel input thresholds.
"""

from __future__ import annotations

from sparsen.core.rules import ThresholdRule
from sparsen.methods.allocation import site_levels
from sparsen.methods.calibration import two_pass
from sparsen.methods.config import AllocatedConfig, method_config
from sparsen.methods.registry import Method, weighted


@method_config
class TealConfig(AllocatedConfig):
    """TEAL: per-linear magnitude thresholds on the inputs of all 7 block linears."""

    method = "teal"


def criterion_thresholds(lm, sparsity, wins, config, progress, scales: dict | None = None, tag: str = "t",
                         lowrank: dict | None = None):
    """Per-linear thresholds on |x_i| (or |x_i| * scales[site][i]) at each site's level.

    Returns (sites, achieved, extras) as a method's ``calibrate`` does; with ``scales`` the sites are
    ``channel_threshold`` entries whose vectors (c / scale) go into the plan's tensors. With ``lowrank``
    (site -> (A, B)) each site also carries that low-rank term for its dropped inputs (R-Sparse), active
    in the second calibration pass as in use.
    """
    ad = lm.adapter
    values = {site: (lambda x, s=scales[site]: x.abs() * s) if scales else (lambda x: x) for site, *_ in ad.linear_sites()}
    probes = {site: (mod, "input", values[site]) for site, _, _, mod in ad.linear_sites()}

    def rule_at(site, c):
        return ThresholdRule(c / scales[site] if scales else c)

    levels = {}

    def build(hists):
        if not levels:  # pass 1: choose each site's level (uniform, or by measured sensitivity)
            chosen, record = site_levels(lm, hists, wins[:config.kl_windows()], sparsity, config, progress,
                                         rule_for=lambda site, s: rule_at(site, hists[site].quantile(s)))
            levels.update(chosen)
            levels["_record"] = record
        sites, tensors, achieved = {}, {}, {}
        for site, h in hists.items():
            c = h.quantile(levels[site])
            achieved[site] = h.share_below(c)
            if scales:
                key = f"{tag}.{site}"
                tensors[key] = (c / scales[site]).float().contiguous()
                sites[site] = {"rule": "channel_threshold", "tensor": key, "target": levels[site]}
            else:
                sites[site] = {"rule": "threshold", "threshold": c, "target": levels[site]}
            if lowrank and site in lowrank:
                key = f"lr.{site}"
                tensors[f"{key}.A"], tensors[f"{key}.B"] = lowrank[site]
                sites[site]["lowrank"] = key
        return sites, tensors, achieved

    sites, tensors, achieved = two_pass(lm, wins, probes, build, sparsity > 0, progress)
    return sites, weighted(lm, achieved), {"params": levels["_record"], "tensors": tensors}


def calibrate(lm, sparsity, wins, config, progress):
    return criterion_thresholds(lm, sparsity, wins, config, progress)


METHOD = Method("teal", "magnitude thresholds on the inputs of all 7 linears (TEAL)", TealConfig, calibrate)
