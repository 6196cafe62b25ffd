"""Calibration helpers shared by methods: streaming magnitude histograms of each block linear's input."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

_LO, _HI, _BINS = -10.0, 5.0, 6000  # log10|x| range; 0.0025 decade per bin (~0.6% threshold resolution)


class MagnitudeHistogram:
    """Histogram of log10|x| over every entry seen; quantiles of |x| from it."""

    def __init__(self):
        self.counts = torch.zeros(_BINS + 2, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        logs = torch.log10(values.detach().abs().float().clamp_min(1e-30))
        idx = ((logs - _LO) / (_HI - _LO) * _BINS).floor().long().clamp(-1, _BINS) + 1
        self.counts += torch.bincount(idx.reshape(-1), minlength=_BINS + 2).double()

    def quantile(self, q: float) -> float:
        """The |x| below which a share q of the entries lies (upper edge of the bin reaching q)."""
        if q <= 0:
            return 0.0
        c = np.cumsum(self.counts.numpy())
        k = int(np.searchsorted(c, q * c[-1], side="left"))
        if k == 0:
            return 10**_LO
        return float(10 ** (_LO + min(k, _BINS) * (_HI - _LO) / _BINS))

    def share_below(self, t: float) -> float:
        if t <= 0:
            return 0.0
        k = int(np.floor((np.log10(t) - _LO) / (_HI - _LO) * _BINS)) + 1
        k = max(0, min(k, _BINS + 1))
        return float(self.counts[:k].sum() / self.counts.sum())


@torch.no_grad()
def input_histograms(lm, wins: torch.Tensor, transform=None, progress: bool = True, desc: str = "calibrate",
                     sparsifier=None) -> dict[str, MagnitudeHistogram]:
    """Histogram of |input| (or of ``transform(site, x)``) of every block linear over calibration windows.

    With ``sparsifier``, it runs during the passes: each linear's input is recorded *before* its own
    mask but *after* the upstream masks, i.e. as the deployed sparse model sees it.
    """
    hists = {site: MagnitudeHistogram() for site, *_ in lm.adapter.linear_sites()}
    handles = []
    for site, _, _, mod in lm.adapter.linear_sites():
        def hook(m, args, site=site):
            x = args[0]
            hists[site].update(transform(site, x) if transform else x)

        handles.append(mod.register_forward_pre_hook(hook))
    if sparsifier is not None:
        sparsifier.attach()  # after our hooks: pre-hooks run in registration order
    try:
        for w in tqdm(wins, desc=desc, unit="win", disable=not progress, leave=False):
            lm.model(w[None])
    finally:
        for h in handles:
            h.remove()
        if sparsifier is not None:
            sparsifier.detach()
    return hists
