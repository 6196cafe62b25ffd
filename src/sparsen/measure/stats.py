"""Streaming statistics of activations: how compressible is a tensor of per-token vectors?

All statistics are per entry or per token over vectors ``x [tokens, d]``:
- ``below_abs[t]``: share of entries with |x| < t (absolute thresholds);
- ``below_rel[r]``: share of entries with |x| < r * rms(token) (scale-free thresholds);
- ``l2_share[f]``: mean over tokens of the share of entries needed (largest first) to keep a
  fraction f of the token's squared L2 norm — the share a perfect per-token top-k must keep;
- ``quantiles[q]``: quantiles of |x| (from a log-spaced histogram, 0.01-decade resolution);
- ``kurtosis``: Pearson kurtosis of the entries, E[(x-m)^4]/var^2 (3 for a Gaussian).
"""

from __future__ import annotations

import numpy as np
import torch

ABS_THRESHOLDS = (1e-3, 1e-2, 1e-1)
REL_THRESHOLDS = (0.1, 0.25, 0.5)
MASS_FRACTIONS = (0.9, 0.95, 0.99)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
_LOG_LO, _LOG_HI, _BINS = -10.0, 6.0, 1600


def mass_share(x: torch.Tensor, fractions=MASS_FRACTIONS) -> torch.Tensor:
    """Per row of x [n, d]: share of entries (largest |x| first) needed to reach each fraction of sum x^2.

    Returns [n, len(fractions)]. A row of zeros needs no entries (share 0).
    """
    sq = x.double().pow(2)
    srt = sq.sort(dim=-1, descending=True).values
    csum = srt.cumsum(-1)
    total = csum[..., -1:]
    out = []
    d = x.shape[-1]
    for f in fractions:
        need = (csum < f * total).sum(-1) + 1  # entries until the cumulative mass reaches f
        need = torch.where(total[..., 0] > 0, need, torch.zeros_like(need))
        out.append(need.clamp(max=d).double() / d)
    return torch.stack(out, -1)


class ActivationStats:
    """Accumulates the statistics above over batches of vectors of one dimension."""

    def __init__(self, dim: int):
        self.dim = dim
        self.tokens = 0
        self.moments = np.zeros(5)  # count, sum x, x^2, x^3, x^4 (float64)
        self.below_abs = np.zeros(len(ABS_THRESHOLDS))
        self.below_rel = np.zeros(len(REL_THRESHOLDS))
        self.l2_share = np.zeros(len(MASS_FRACTIONS))
        self.hist = np.zeros(_BINS + 2)  # underflow, bins, overflow of log10|x|

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.dim).double()
        n = x.shape[0]
        self.tokens += n
        self.moments += [x.numel(), x.sum().item(), x.pow(2).sum().item(), x.pow(3).sum().item(), x.pow(4).sum().item()]
        a = x.abs()
        for i, t in enumerate(ABS_THRESHOLDS):
            self.below_abs[i] += (a < t).sum().item()
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        for i, r in enumerate(REL_THRESHOLDS):
            self.below_rel[i] += (a < r * rms).sum().item()
        self.l2_share += mass_share(x).sum(0).numpy()
        logs = torch.log10(a.clamp_min(1e-30)).float()
        idx = ((logs - _LOG_LO) / (_LOG_HI - _LOG_LO) * _BINS).floor().long().clamp(-1, _BINS) + 1
        self.hist += torch.bincount(idx.reshape(-1), minlength=_BINS + 2).numpy()

    def quantile(self, q: float) -> float:
        """Quantile of |x| from the histogram (geometric midpoint of the bin holding it)."""
        c = np.cumsum(self.hist)
        k = int(np.searchsorted(c, q * c[-1], side="left"))
        if k == 0:
            return 0.0
        k = min(k, _BINS)
        lo = _LOG_LO + (k - 1) * (_LOG_HI - _LOG_LO) / _BINS
        return float(10 ** (lo + 0.5 * (_LOG_HI - _LOG_LO) / _BINS))

    def result(self) -> dict:
        n, s1, s2, s3, s4 = self.moments
        mean = s1 / n
        var = s2 / n - mean**2
        m4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4
        entries = n
        return {
            "tokens": int(self.tokens),
            "dim": self.dim,
            "mean": mean,
            "std": float(np.sqrt(max(var, 0.0))),
            "kurtosis": float(m4 / var**2) if var > 0 else float("nan"),
            "below_abs": {str(t): self.below_abs[i] / entries for i, t in enumerate(ABS_THRESHOLDS)},
            "below_rel_rms": {str(r): self.below_rel[i] / entries for i, r in enumerate(REL_THRESHOLDS)},
            "l2_share": {str(f): self.l2_share[i] / self.tokens for i, f in enumerate(MASS_FRACTIONS)},
            "abs_quantiles": {str(q): self.quantile(q) for q in QUANTILES},
        }


def attention_coverage(probs: torch.Tensor, fractions=(0.9, 0.95), min_keys: int = 1) -> torch.Tensor:
    """Share of causal keys needed to cover each fraction of the attention mass, per head.

    ``probs [B, H, T, T]`` (rows sum to 1 over keys 0..q). For query q the share is
    (keys needed, largest weights first) / (q + 1). Averaged over batch and over queries with at
    least ``min_keys`` causal keys. Returns [H, len(fractions)].
    """
    B, H, T, _ = probs.shape
    srt = probs.float().sort(dim=-1, descending=True).values
    csum = srt.cumsum(-1)
    n_keys = torch.arange(1, T + 1, dtype=torch.float32)
    rows = n_keys >= min(min_keys, T)
    out = []
    for f in fractions:
        need = ((csum < f * csum[..., -1:]).sum(-1) + 1).float()
        need = torch.minimum(need, n_keys)
        share = need / n_keys  # [B, H, T]
        out.append(share[..., rows].mean(dim=(0, 2)))
    return torch.stack(out, -1)
