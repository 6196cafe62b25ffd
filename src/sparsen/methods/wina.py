"""WINA (Chen et al., 2025; microsoft/wina): weight-informed activation sparsity.

Keep input channel i of linear W when |x_i| * ||W[:, i]||_2 is large: a channel read by small
weights contributes little to the output even when |x_i| is large. Per linear, the threshold c on
that criterion is its calibration quantile at the target, stored as per-channel input thresholds
t_i = c / ||W[:, i]||. All seven linears, each with its own column norms (the paper's rule; the
released Llama code applies the norm to gate and k only), so q/k/v (and gate/up) get separate masks.
"""

from __future__ import annotations

from sparsen.methods.config import AllocatedConfig, method_config
from sparsen.methods.registry import Method
from sparsen.methods.teal import criterion_thresholds


@method_config
class WinaConfig(AllocatedConfig):
    """WINA: thresholds on |x_i| * ||W[:, i]||, per linear, stored as per-channel input thresholds."""

    method = "wina"


def column_norms(lm) -> dict:
    return {site: mod.weight.detach().float().norm(dim=0).clamp_min(1e-12) for site, _, _, mod in lm.adapter.linear_sites()}


def calibrate(lm, sparsity, wins, config, progress):
    return criterion_thresholds(lm, sparsity, wins, config, progress, scales=column_norms(lm), tag="wina")


METHOD = Method("wina", "WINA: keep inputs with large |x_i|*||W[:,i]||, per-linear thresholds on that criterion",
                WinaConfig, calibrate)
