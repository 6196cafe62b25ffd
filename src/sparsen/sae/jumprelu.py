"""JumpReLU (Rajamanoharan et al. 2024): f_j = pre_j if pre_j > theta_j else 0, a learned threshold per latent.

Training: the threshold (log-parametrised) learns through straight-through estimators with a rectangle kernel of
width ``bandwidth``; the sparsity term pulls the L0 toward ``target_l0``:
l0_coefficient * (L0 / target_l0 - 1)^2 (SAELens's "quadratic" L0 mode), L0 counted by the same estimator.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from sparsen.core.config import check, strict_config
from sparsen.sae.base import SAEConfig, SparseCoder, TrainOutput, fvu


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); d/dpre = H(pre - theta), d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g * (pre > theta)
        g_theta = (-(theta / eps) * _rect((pre - theta) / eps) * g).reshape(-1, theta.shape[-1]).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta); d/dtheta = -(1 / eps) K((pre - theta) / eps), no gradient to pre."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = (-(1.0 / eps) * _rect((pre - theta) / eps) * g).reshape(-1, theta.shape[-1]).sum(0)
        return None, g_theta, None


@strict_config
class JumpReluConfig(SAEConfig):
    architecture: ClassVar[str] = "jumprelu"
    target_l0: float = 32.0
    """the mean number of active latents per token the sparsity term aims at"""
    l0_coefficient: float = 1.0
    """weight of (L0 / target_l0 - 1)^2"""
    bandwidth: float = 0.05
    """the straight-through estimators' kernel width (in units of the pre-activations)"""
    init_threshold: float = 0.01
    """every latent's threshold at initialisation"""
    decoder_init_norm: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check(self.target_l0 > 0, "target_l0 must be > 0")
        check(self.bandwidth > 0, "bandwidth must be > 0")
        check(self.init_threshold > 0, "init_threshold must be > 0")
        check(self.l0_coefficient >= 0, "l0_coefficient must be >= 0")


class JumpReluSAE(SparseCoder):
    config_class = JumpReluConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)  # SAELens's inference (ReLU too: a threshold may be < 0)

    @torch.no_grad()
    def initialize(self, sample_in, sample_out, generator) -> None:
        super().initialize(sample_in, sample_out, generator)
        self.log_threshold.fill_(math.log(self.cfg.init_threshold))

    def training_output(self, x, target, dead) -> TrainOutput:
        pre = self.pre_acts(x)
        theta = self.threshold
        f = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        recon = self.decode(f, x)
        err = fvu(target, recon)
        l0_ste = _Step.apply(pre, theta, self.cfg.bandwidth).sum(-1).mean()
        aux = self.cfg.l0_coefficient * (l0_ste / self.cfg.target_l0 - 1).pow(2)
        active = (f != 0).any(0)
        return TrainOutput(err + aux, recon, err.detach(), aux.detach(), active, (f != 0).sum(1).float().mean())

    def extra_state_tensors(self):
        return {"threshold": self.threshold.detach()}

    @torch.no_grad()
    def load_extra_state_tensors(self, tensors):
        if "threshold" in tensors:
            self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
