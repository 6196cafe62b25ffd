"""TopK (Gao et al. 2024): keep each token's k largest pre-activations (ReLU'd), with the AuxK loss for dead latents.

AuxK: the residual e = target - x_hat (detached) is reconstructed from the k_aux largest pre-activations among the
dead latents, without b_dec; the term is aux_coefficient * min(n_dead / k_aux, 1) * ||e - e_hat||^2 / ||e - mean e||^2
(SAELens's scale; the normalised error as in OpenAI's and sparsify's). It is off until a latent is dead, which the
trainer counts in tokens (``TrainConfig.dead_tokens``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sparsen.core.config import check, strict_config
from sparsen.sae.base import SAEConfig, SparseCoder, TrainOutput, fvu
from sparsen.sae.sparse_ops import sparse_decode, topk_encode


@strict_config
class TopKConfig(SAEConfig):
    architecture: ClassVar[str] = "topk"
    k: int = 32
    """active latents per token"""
    aux_k: int | None = None
    """latents AuxK may use per token (None: d_in // 2, as SAELens and OpenAI)"""
    aux_coefficient: float = 1 / 32
    """weight of the AuxK term (OpenAI's 1/32)"""
    rescale_acts_by_decoder_norm: bool = False
    """SAELens's option: pre-activations are multiplied by W_dec's row norms before the top-k and the latents divided
    by them before decoding (no effect with unit-norm rows, which sparsen's trainer keeps)"""

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.k, int) and 0 < self.k <= self.d_sae, f"k must be in 1..d_sae ({self.d_sae}), not {self.k!r}")
        check(self.aux_k is None or (isinstance(self.aux_k, int) and self.aux_k >= 0), "aux_k must be >= 0 or None")
        check(self.aux_coefficient >= 0, "aux_coefficient must be >= 0")

    @property
    def k_aux(self) -> int:
        return self.d_in // 2 if self.aux_k is None else self.aux_k


def sparse_encode(sae, x, k: int, dead, signed: bool = False):
    """``topk_encode`` of a top-k dictionary's input (b_dec subtracted if its config says so), AuxK's dead latents
    included when its coefficient is not 0."""
    xin = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    k_aux = sae.cfg.k_aux if sae.cfg.aux_coefficient > 0 else 0
    return topk_encode(xin, sae.W_enc, sae.b_enc, k, k_aux, dead, signed)


def sparse_losses(sae, x, target, vals, idx, aux_vals, aux_idx, dead):
    """(reconstruction from the active rows, its FVU, the weighted AuxK term) of a top-k dictionary's batch."""
    recon = sparse_decode(vals, idx, sae.W_dec) + sae.b_dec
    if sae.W_skip is not None:
        recon = recon + x @ sae.W_skip.T
    err = fvu(target, recon)
    aux = err.new_zeros(())
    if aux_idx.shape[1]:
        e = (target - recon).detach()
        scale = min(int(dead.sum()) / sae.cfg.k_aux, 1.0)
        aux = sae.cfg.aux_coefficient * scale * fvu(e, sparse_decode(aux_vals, aux_idx, sae.W_dec))
    return recon, err, aux


class TopKSAE(SparseCoder):
    config_class = TopKConfig
    unit_norm_decoder = True
    signed: ClassVar[bool] = False

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        score = pre.abs() if self.signed else pre
        vals, idx = score.topk(self.cfg.k, dim=-1)
        vals = pre.gather(-1, idx) if self.signed else vals.clamp_min(0)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            latents = latents / self.W_dec.norm(dim=-1)
        return latents @ self.W_dec + self.b_dec

    def training_output(self, x, target, dead) -> TrainOutput:
        vals, idx, aux_vals, aux_idx = sparse_encode(self, x, self.cfg.k, dead, self.signed)
        recon, err, aux = sparse_losses(self, x, target, vals, idx, aux_vals, aux_idx, dead)
        active = torch.zeros(self.cfg.d_sae, dtype=torch.bool)
        active[idx[vals != 0]] = True
        l0 = (vals != 0).sum(1).float().mean()
        return TrainOutput(err + aux, recon, err.detach(), aux.detach(), active, l0)
