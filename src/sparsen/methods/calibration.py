"""Calibration helpers shared by methods: streaming magnitude histograms of each block linear's input."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsen.core.hooks import Sparsifier
from sparsen.core.rules import rule_from_entry

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
def collect_histograms(lm, wins: torch.Tensor, probes: dict, progress: bool = True, desc: str = "calibrate",
                       sparsifier=None, skip: int = 0) -> dict[str, MagnitudeHistogram]:
    """Histograms of magnitudes observed by ``probes`` over calibration windows.

    ``probes[key] = (module, where, values)``: ``where`` is "input" (the module's input) or "output";
    ``values(t)`` maps that tensor to the magnitudes to histogram. With ``sparsifier``, it runs during
    the passes and every probe sees its tensor *before* that site's own mask but *after* the upstream
    masks, i.e. as the deployed sparse model produces it (hooks run in registration order).
    The first ``skip`` positions of each window are not observed (and stay dense under ``sparsifier``).
    """
    hists = {key: MagnitudeHistogram() for key in probes}
    handles = []

    def observe(key, f, t):
        hists[key].update(f(t[..., skip:, :]))

    for key, (mod, where, values) in probes.items():
        if where == "input":
            handles.append(mod.register_forward_pre_hook(lambda m, args, key=key, f=values: observe(key, f, args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, key=key, f=values: observe(key, f, out)))
    if sparsifier is not None:
        sparsifier.dense_prefix = skip
        sparsifier.attach()
    try:
        for w in tqdm(wins, desc=desc, unit="win", disable=not progress, leave=False):
            lm.adapter.trunk(w[None])
    finally:
        for h in handles:
            h.remove()
        if sparsifier is not None:
            sparsifier.detach()
    return hists


def two_pass(lm, wins, probes: dict, build, sparse: bool, progress: bool = True, skip: int | None = None):
    """Thresholds set on the activations the sparse model actually produces.

    Pass 1 histograms the probes on the dense model and ``build(hists) -> (sites, tensors, achieved)``
    turns them into plan site entries; pass 2 repeats with pass 1's rules active, so that each
    threshold sees the upstream masks (one dense pass undershoots the target). ``achieved`` is the
    per-site share of skipped inputs the histograms predict. Only positions >= ``skip`` (default: the
    second half of each window) are observed and made sparse: as in decoding after a dense prompt,
    which is where a plan is used (early positions, e.g. the attention-sink token, are atypical).
    """
    skip = wins.shape[1] // 2 if skip is None else skip

    hists = collect_histograms(lm, wins, probes, progress, "calibration pass 1/2", skip=skip)
    sites, tensors, achieved = build(hists)
    if sparse:
        rules = {s: r for s, e in sites.items() if (r := rule_from_entry(e, tensors)) is not None}
        first = Sparsifier(lm.adapter, rules)
        hists = collect_histograms(lm, wins, probes, progress, "calibration pass 2/2", sparsifier=first, skip=skip)
        sites, tensors, achieved = build(hists)
    return sites, tensors, achieved
