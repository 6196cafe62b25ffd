"""CHESS (He et al., EMNLP 2024): channel-wise thresholds on the MLP, plus q and o input thresholds.

MLP: channel i of the intermediate is zeroed when |a_i| <= sqrt(T / E[u_i^2]) (a = act(gate(x)),
u = up(x)), i.e. when |a_i| * rms(u_i) <= sqrt(T): a per-channel threshold that accounts for how
large up's output usually is on that channel. E[u_i^2] comes from a dense calibration pass; T is a
per-layer quantile of |a_i| * rms(u_i). Attention: magnitude thresholds on the inputs of q and o
only (k and v stay dense). The covered linears (q, o, up, down) share one level.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sparsen.methods.calibration import two_pass
from sparsen.methods.config import MethodConfig, method_config
from sparsen.methods.registry import Method, level_for, weighted


@method_config
class ChessConfig(MethodConfig):
    """CHESS: per-channel MLP thresholds |act(gate)_i| * rms(up_i), plus magnitude thresholds on the q and o inputs."""

    method = "chess"


@torch.no_grad()
def up_rms(lm, wins, progress) -> list[torch.Tensor]:
    """Per layer, sqrt(E[u_i^2]) of up's output channels on the dense model."""
    sums = [torch.zeros(lm.adapter.intermediate_size, dtype=torch.float64) for _ in lm.adapter.blocks]
    count = [0]
    handles = []
    for b in lm.adapter.blocks:
        def hook(m, args, out, i=b.index):
            u = out.reshape(-1, out.shape[-1]).double()
            sums[i] += u.pow(2).sum(0)
            if i == 0:
                count[0] += u.shape[0]

        handles.append(b.linears["up"].register_forward_hook(hook))
    try:
        for w in tqdm(wins, desc="up-channel statistics", unit="win", disable=not progress, leave=False):
            lm.adapter.trunk(w[None])
    finally:
        for h in handles:
            h.remove()
    return [(s / count[0]).sqrt().float().clamp_min(1e-12) for s in sums]


def calibrate(lm, sparsity, wins, config, progress):
    ad = lm.adapter
    covered = [f"layers.{b.index}.{n}" for b in ad.blocks for n in ("q", "o", "up", "down")]
    level = level_for(lm, covered, sparsity, "chess")
    rms = up_rms(lm, wins, progress) if sparsity > 0 else [torch.ones(ad.intermediate_size) for _ in ad.blocks]
    probes = {}
    for b in ad.blocks:
        i = b.index
        probes[f"layers.{i}.q"] = (b.linears["q"], "input", lambda x: x)
        probes[f"layers.{i}.o"] = (b.linears["o"], "input", lambda x: x)
        probes[f"layers.{i}.down"] = (b.linears["gate"], "output", lambda g, r=rms[i], act=ad.activation: act(g) * r)

    def build(hists):
        sites = {site: {"rule": "dense"} for site, *_ in ad.linear_sites()}
        tensors, achieved = {}, {}
        for site, h in hists.items():
            t = h.quantile(level)
            achieved[site] = h.share_below(t)
            if site.endswith(".down"):
                i = int(site.split(".")[1])
                key = f"chess.{site}"
                tensors[key] = (t / rms[i]).contiguous()
                sites[site] = {"rule": "gate_act", "tensor": key, "target": level}
                achieved[f"layers.{i}.up"] = achieved[site]
            else:
                sites[site] = {"rule": "threshold", "threshold": t, "target": level}
        return sites, tensors, achieved

    sites, tensors, achieved = two_pass(lm, wins, probes, build, sparsity > 0, progress)
    return sites, weighted(lm, achieved), {"params": {"level": level}, "tensors": tensors}


METHOD = Method("chess", "CHESS: per-channel MLP thresholds |act(gate)|*rms(up) plus q and o input thresholds",
                ChessConfig, calibrate)
