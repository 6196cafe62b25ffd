"""Streaming statistics of activations: how compressible is a tensor of per-token vectors?

All statistics are per entry or per token over vectors ``x [tokens, d]``:
- ``below_abs[t]``: share of entries with |x| < t (absolute thresholds);
- ``below_rel[r]``: share of entries with |x| < r * rms(token) (scale-free thresholds);
- ``l2_share[f]``: mean over tokens of the share of entries needed (largest first) to keep a
  fraction f of the token's squared L2 norm — the share a perfect per-token top-k must keep;
- ``quantiles[q]``: quantiles of |x| (from a log-spaced histogram, 0.01-decade resolution);
- ``kurtosis``: Pearson kurtosis of the entries, E[(x-m)^4]/var^2 (3 for a Gaussian);
- ``out_err[s]`` (when the weight that reads x is given): relative output error of that linear when
  the share s of each token's smallest-|x| entries is zeroed: mean over tokens of ||W x_dropped|| / ||W x||
  (a per-token mean, so that the few tokens with massive norms do not dominate).
  This is what input sparsity costs; input-side L2 shares can mislead where a few outlier channels
  carry most of the mass (the residual stream) but are read by small weights.
"""

from __future__ import annotations

import numpy as np
import torch

ABS_THRESHOLDS = (1e-3, 1e-2, 1e-1)
REL_THRESHOLDS = (0.1, 0.25, 0.5)
MASS_FRACTIONS = (0.9, 0.95, 0.99)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
OUT_SPARSITIES = (0.5, 0.7)
OUT_ERR_TOKEN_STRIDE = 4  # output error on every 4th token: a matmul per sparsity is the costly part
_LOG_LO, _LOG_HI, _BINS = -10.0, 6.0, 1600


def mass_share(x: torch.Tensor, fractions=MASS_FRACTIONS) -> torch.Tensor:
    """Per row of x [n, d]: share of entries (largest |x| first) needed to reach each fraction of sum x^2.

    Returns [n, len(fractions)]. A row of zeros needs no entries (share 0).
    """
    sq = x.float().pow(2)
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
        self.out_err = np.zeros((len(OUT_SPARSITIES), 2))  # sum of per-token relative errors, tokens

    def update(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add vectors ``x [..., dim]``; ``weight [out, dim]`` (the linear reading x) enables out_err."""
        # float32 elementwise work, float64 accumulation: the sums stay exact enough, the sorts stay fast.
        x = x.detach().reshape(-1, self.dim).float()
        n = x.shape[0]
        self.tokens += n
        x2 = x * x
        f64 = torch.float64
        self.moments += [x.numel(), x.sum(dtype=f64).item(), x2.sum(dtype=f64).item(), (x2 * x).sum(dtype=f64).item(),
                         (x2 * x2).sum(dtype=f64).item()]
        a = x.abs()
        for i, t in enumerate(ABS_THRESHOLDS):
            self.below_abs[i] += (a < t).sum().item()
        rms = x2.mean(-1, keepdim=True).sqrt()
        for i, r in enumerate(REL_THRESHOLDS):
            self.below_rel[i] += (a < r * rms).sum().item()
        self.l2_share += mass_share(x).sum(0).numpy()
        logs = torch.log10(a.clamp_min(1e-30))
        idx = ((logs - _LOG_LO) / (_LOG_HI - _LOG_LO) * _BINS).floor().long().clamp(-1, _BINS) + 1
        self.hist += torch.bincount(idx.reshape(-1), minlength=_BINS + 2).numpy()
        if weight is not None:
            xs = x[::OUT_ERR_TOKEN_STRIDE]
            full = (xs @ weight.T.float()).norm(dim=-1).clamp_min(1e-30)
            order = xs.abs().argsort(dim=-1)
            for i, sp in enumerate(OUT_SPARSITIES):
                k = int(round(sp * self.dim))
                dropped = torch.zeros_like(xs).scatter_(1, order[:, :k], xs.gather(1, order[:, :k]))
                rel = (dropped @ weight.T.float()).norm(dim=-1) / full
                self.out_err[i] += [rel.sum(dtype=torch.float64).item(), xs.shape[0]]

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
            **({"out_err": {str(sp): float(self.out_err[i, 0] / self.out_err[i, 1])
                            for i, sp in enumerate(OUT_SPARSITIES)}} if self.out_err[:, 1].any() else {}),
        }


def attention_coverage(probs: torch.Tensor, fractions=(0.9, 0.95), min_keys: int = 1, max_rows: int | None = None
                       ) -> torch.Tensor:
    """Share of causal keys needed to cover each fraction of the attention mass, per head.

    ``probs [B, H, T, T]`` (rows sum to 1 over keys 0..q). For query q the share is
    (keys needed, largest weights first) / (q + 1). Averaged over batch and over queries with at
    least ``min_keys`` causal keys; ``max_rows`` evenly subsamples those queries (sorting every
    row of a long context costs more than the forward pass). Returns [H, len(fractions)].
    """
    B, H, T, _ = probs.shape
    rows = torch.arange(min(min_keys, T) - 1, T)
    if max_rows is not None and len(rows) > max_rows:
        rows = rows[torch.linspace(0, len(rows) - 1, max_rows).round().long()]
    srt = probs[:, :, rows].float().sort(dim=-1, descending=True).values
    csum = srt.cumsum(-1)
    n_keys = (rows + 1).float()
    out = []
    for f in fractions:
        need = ((csum < f * csum[..., -1:]).sum(-1) + 1).float()
        need = torch.minimum(need, n_keys)
        out.append((need / n_keys).mean(dim=(0, 2)))
    return torch.stack(out, -1)
