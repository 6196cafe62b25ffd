"""Per-token top-k selections, exact and statistical, differentiable.

Exact: the k largest entries of each row (``torch.topk``), the rest zeroed; gradients reach the kept entries.

Statistical (Spark Transformer; Gemma 3n's ``_gaussian_topk``): a per-row threshold from the row's own mean and
population standard deviation, theta = mean + std * Phi^-1(1 - k/d), exact in expectation for Gaussian rows. No sort:
two reductions and one elementwise pass. ``soft`` returns max(x - theta, 0) (Spark, Gemma 3n; the gradient also flows
through theta's mean and std), hard returns x where x > theta (the gradient reaches the kept entries only).
"""

from __future__ import annotations

import torch

from sparsen.core.rules import normal_quantile
from sparsen.errors import SparsenError


def check_k(k: int, d: int, what: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= d:
        raise SparsenError(f"{what} must be an integer in 1..{d} (the width), not {k!r}")


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of each row's k largest entries (ties broken by torch.topk)."""
    check_k(k, x.shape[-1])
    if k == x.shape[-1]:
        return torch.ones_like(x, dtype=torch.bool)
    idx = x.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def exact_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but each row's k largest entries zeroed."""
    return x * topk_mask(x, k)


def statistical_threshold(x: torch.Tensor, k: int | None = None, sparsity: float | None = None) -> torch.Tensor:
    """mean + std * Phi^-1(q) per row (population std, as Gemma 3n), shape [..., 1]; q = 1 - k/d, or the target
    ``sparsity`` itself (Gemma 3n's ``activation_sparsity``)."""
    d = x.shape[-1]
    if sparsity is None:
        check_k(k, d)
        q = 1 - k / d
    else:
        if not 0 < sparsity < 1:
            raise SparsenError(f"sparsity must be in (0, 1), not {sparsity!r}")
        q = sparsity
    std, mean = torch.std_mean(x, dim=-1, keepdim=True, correction=0)
    return mean + std * normal_quantile(q)


class _SoftThreshold(torch.autograd.Function):
    """max(x - mean - q * std, 0) per row with its gradient in closed form (one reduction; autograd through std_mean
    would save and replay several [n, d] tensors). With m the kept mask, g' = g * m and S = sum g':
    dx = g' - S / d - q * S * (x - mean) / (d * std)."""

    @staticmethod
    def forward(ctx, x, q):
        std, mean = torch.std_mean(x, dim=-1, keepdim=True, correction=0)
        y = torch.sub(x, mean + q * std).clamp_min_(0)
        ctx.save_for_backward(x, y, mean, std)
        ctx.q = q
        return y

    @staticmethod
    def backward(ctx, g):
        x, y, mean, std = ctx.saved_tensors
        gk = torch.where(y > 0, g, 0.0)
        s = gk.sum(-1, keepdim=True)
        coef = s * (ctx.q / (x.shape[-1] * std.clamp_min(1e-12)))
        # gk - s/d - coef (x - mean), as one fused multiply-add and one in-place add (two passes, one allocation)
        return torch.addcmul(gk, x, coef, value=-1).add_(coef * mean - s / x.shape[-1]), None


def statistical_topk(x: torch.Tensor, k: int | None = None, soft: bool = True, sparsity: float | None = None
                     ) -> torch.Tensor:
    """Statistical top-k of each row: soft max(x - theta, 0), or hard x * (x > theta). With k = d every entry is
    kept as it is."""
    d = x.shape[-1]
    if sparsity is None and k == d:
        return x
    if soft:
        if sparsity is None:
            check_k(k, d)
        elif not 0 < sparsity < 1:
            raise SparsenError(f"sparsity must be in (0, 1), not {sparsity!r}")
        return _SoftThreshold.apply(x, normal_quantile(1 - k / d if sparsity is None else sparsity))
    return x * (x > statistical_threshold(x, k, sparsity))


def kept_count(x: torch.Tensor) -> torch.Tensor:
    """Nonzero entries per row."""
    return (x != 0).sum(-1)
