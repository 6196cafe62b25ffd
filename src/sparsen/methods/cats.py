"""CATS (Lee et al., COLM 2024): threshold the MLP's gate activation.

a = act(gate(x)) (SiLU; tanh-GELU for Gemma); channel j of the MLP intermediate is kept iff |a_j| > t_layer,
t the quantile of |a| on calibration tokens. gate is computed dense; up rows and down columns of inactive channels
are skipped, so only up and down (2/3 of the MLP) count as skipped bytes. Attention stays dense:
CATS reaches at most ~0.5 model-wide sparsity on a Llama block.
"""

from __future__ import annotations

from sparsen.methods.calibration import two_pass
from sparsen.methods.config import MethodConfig, method_config
from sparsen.methods.registry import Method, level_for, weighted


@method_config
class CatsConfig(MethodConfig):
    """CATS: a per-layer threshold on |act(gate)|; covers up and down only (at most ~0.45 model-wide on SmolLM2)."""

    method = "cats"


def mlp_sites(lm):
    return [f"layers.{b.index}.{n}" for b in lm.adapter.blocks for n in ("up", "down")]


def calibrate(lm, sparsity, wins, config, progress):
    level = level_for(lm, mlp_sites(lm), sparsity, "cats")
    probes = {f"layers.{b.index}.down": (b.linears["gate"], "output", lm.adapter.activation) for b in lm.adapter.blocks}

    def build(hists):
        sites = {site: {"rule": "dense"} for site, *_ in lm.adapter.linear_sites()}
        achieved = {}
        for site, h in hists.items():
            t = h.quantile(level)
            sites[site] = {"rule": "gate_act", "threshold": t, "target": level}
            achieved[site] = achieved[site[: -len("down")] + "up"] = h.share_below(t)
        return sites, {}, achieved

    sites, _, achieved = two_pass(lm, wins, probes, build, sparsity > 0, progress)
    return sites, weighted(lm, achieved), {"params": {"mlp_level": level}}


METHOD = Method("cats", "CATS: threshold |act(gate)| per layer; gate dense, up rows and down columns skipped", CatsConfig,
                calibrate)
