"""ReLU + L1 (the "standard" SAE of Bricken et al. and SAELens): f = ReLU(pre), an L1 penalty weighted by the
decoder rows' norms, so that shrinking f while growing W_dec does not pay.

Loss: FVU + l1_coefficient * E_tokens[sum_j f_j ||W_dec_j||] / sqrt(E||x - mean x||^2) (both terms scale-free,
so one coefficient serves residual streams of any norm), the coefficient ramped up over ``l1_warmup_tokens``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sparsen.core.config import check, strict_config
from sparsen.sae.base import SAEConfig, SparseCoder, TrainOutput, fvu


@strict_config
class ReluConfig(SAEConfig):
    architecture: ClassVar[str] = "standard"
    l1_coefficient: float = 5.0
    """weight of the decoder-norm weighted L1 term"""
    l1_warmup_tokens: int = 0
    """tokens over which the L1 weight ramps linearly from 0"""
    decoder_init_norm: float = 0.1
    """norm of the decoder rows at initialisation (SAELens's default)"""

    def __post_init__(self):
        super().__post_init__()
        check(self.l1_coefficient >= 0, "l1_coefficient must be >= 0")
        check(self.l1_warmup_tokens >= 0, "l1_warmup_tokens must be >= 0")


class ReluSAE(SparseCoder):
    config_class = ReluConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))  # for the L1 warm-up, resumable

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def training_output(self, x, target, dead) -> TrainOutput:
        f = self.encode(x)
        recon = self.decode(f, x)
        err = fvu(target, recon)
        scale = (target - target.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
        l1 = (f * self.W_dec.norm(dim=1)).sum(1).mean() / scale
        seen = int(self.tokens_seen)
        ramp = 1.0 if not self.cfg.l1_warmup_tokens else min(1.0, seen / self.cfg.l1_warmup_tokens)
        self.tokens_seen += x.shape[0]
        aux = self.cfg.l1_coefficient * ramp * l1
        active = (f > 0).any(0)
        return TrainOutput(err + aux, recon, err.detach(), aux.detach(), active, (f > 0).sum(1).float().mean())
