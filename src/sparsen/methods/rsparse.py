"""R-Sparse (Zhang et al., ICLR 2025): sparse inputs plus a low-rank term for what the mask drops.

Per linear, y = W (x * m) + B A (x * (1 - m)): the kept inputs go through the full weight, the dropped
ones through its rank-r SVD approximation (A = S_r V_r^T [r, in], B = U_r [out, r]). The mask is WINA's
criterion |x_i| * ||W[:, i]||, as in the paper. The low-rank term reads r * (in + out) weights per token,
so it is charged against the sparsity: the masks skip ``sparsity`` plus that charge, and the plan's
*effective* sparsity is the target. The paper searches (channel share, rank) per linear with an
evolutionary search; here every linear spends the same share (``rank_share``) of its bytes on its low-rank term.
"""

from __future__ import annotations

import torch

from sparsen.methods.config import ConfigValueError, MethodConfig, method_config
from sparsen.methods.registry import Method
from sparsen.methods.teal import criterion_thresholds
from sparsen.methods.wina import column_norms


@method_config
class RSparseConfig(MethodConfig):
    """R-Sparse: WINA's masks plus a rank-r SVD term of each linear for its dropped inputs (the term's bytes charged)."""

    method = "rsparse"

    rank_share: float = 0.015
    """share of each linear's weight bytes spent on its low-rank term: r = rank_share * in * out / (in + out)
    (5% did worse than WINA's masks alone on SmolLM2, BENCHMARKS.md; 1.5% about equals them)"""

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rank_share, bool) or not isinstance(self.rank_share, (int, float)) or not 0 < self.rank_share < 0.5:
            raise ConfigValueError(f"rank_share {self.rank_share!r}: give a share of each linear's bytes in (0, 0.5)")


def rank_for(n_in: int, n_out: int, share: float) -> int:
    return max(1, min(n_in, n_out, round(share * n_in * n_out / (n_in + n_out))))


@torch.no_grad()
def low_rank_terms(lm, share: float) -> dict:
    """Per site, (A [r, in], B [out, r]) with B A the best rank-r approximation of the linear's weight."""
    out = {}
    for site, _, _, mod in lm.adapter.linear_sites():
        W = mod.weight.detach().double()
        r = rank_for(W.shape[1], W.shape[0], share)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        out[site] = ((S[:r, None] * Vh[:r]).float().contiguous(), U[:, :r].float().contiguous())
    return out


def charged_share(lm, terms: dict) -> float:
    """The low-rank terms' weights as a share of the block-linear weights (charged against the sparsity)."""
    return sum(A.numel() + B.numel() for A, B in terms.values()) / sum(lm.adapter.linear_params().values())


def calibrate(lm, sparsity, wins, config, progress):
    terms = low_rank_terms(lm, config.rank_share) if sparsity > 0 else {}  # nothing dropped at 0: a low-rank term would only cost
    charge = charged_share(lm, terms)
    sites, achieved, extras = criterion_thresholds(lm, sparsity + charge, wins, config, progress,
                                                   scales=column_norms(lm), tag="rs", lowrank=terms)
    return sites, achieved - charge, {**extras, "params": {**extras["params"], "rank_share": config.rank_share,
                                                           "charged_share": charge}}


METHOD = Method("rsparse", "R-Sparse: WINA's masks plus a rank-r SVD term for the dropped inputs (its bytes "
                "charged; by default 1.5% of each linear's)", RSparseConfig, calibrate)
