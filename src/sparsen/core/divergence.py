"""The one KL formula every part that compares a sparse model with the dense one uses."""

from __future__ import annotations

import torch


def kl_per_position(dense_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(dense || sparse) of each position: rows are positions, columns the vocabulary's log-probs (the dense ones
    may be held in lower precision than ``logp``)."""
    return (dense_logp.exp() * (dense_logp - logp)).sum(-1)


def kl_sum(dense_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(dense || sparse) (callers divide by the positions they scored)."""
    return kl_per_position(dense_logp, logp).sum()
