"""BatchTopK (Bussmann et al. 2024): in training, the batch's k * batch_size largest ReLU'd pre-activations are kept
(a token may use more or fewer than k, at most 4k: the batch's choice is made among each token's top 4k); at
inference a single threshold replaces the batch (a JumpReLU with one theta for every latent, as SAELens saves it).

The threshold is an exponential moving average of the smallest positive activation kept in each training batch
(``threshold_lr`` per step, SAELens's ``topk_threshold_lr``). AuxK as in TopK.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sparsen.core.config import check, strict_config
from sparsen.sae.base import SparseCoder, TrainOutput
from sparsen.sae.topk import TopKConfig, sparse_encode, sparse_losses


@strict_config
class BatchTopKConfig(TopKConfig):
    architecture: ClassVar[str] = "batchtopk"
    threshold_lr: float = 0.01
    """step of the threshold's moving average"""

    def __post_init__(self):
        super().__post_init__()
        check(0 < self.threshold_lr <= 1, "threshold_lr must be in (0, 1]")


class BatchTopKSAE(SparseCoder):
    config_class = BatchTopKConfig
    unit_norm_decoder = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)  # SAELens's inference (ReLU too: a threshold may be < 0)

    def training_output(self, x, target, dead) -> TrainOutput:
        B = x.shape[0]
        # Each token's top-k first (a superset of what the batch keeps per token), then the batch's top k*B of those.
        vals, idx, aux_vals, aux_idx = sparse_encode(self, x, min(self.cfg.d_sae, 4 * self.cfg.k), dead)
        flat = vals.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.detach().topk(min(self.cfg.k * B, flat.numel())).indices] = True
        keep &= flat.detach() > 0
        vals = vals * keep.reshape(vals.shape)
        recon, err, aux = sparse_losses(self, x, target, vals, idx, aux_vals, aux_idx, dead)
        kept = vals.detach()[keep.reshape(vals.shape)]
        self._batch_min = float(kept.min()) if kept.numel() else None
        active = torch.zeros(self.cfg.d_sae, dtype=torch.bool)
        active[idx[keep.reshape(vals.shape)]] = True
        l0 = keep.reshape(vals.shape).sum(1).float().mean()
        return TrainOutput(err + aux, recon, err.detach(), aux.detach(), active, l0)

    @torch.no_grad()
    def after_step(self, out) -> None:
        m = getattr(self, "_batch_min", None)
        if m is not None:
            t = float(self.threshold)
            self.threshold.fill_(m if t == 0 else t + self.cfg.threshold_lr * (m - t))

    def extra_state_tensors(self):
        return {"threshold": self.threshold.expand(self.cfg.d_sae).clone()}

    @torch.no_grad()
    def load_extra_state_tensors(self, tensors):
        if "threshold" in tensors:
            self.threshold.fill_(float(tensors["threshold"].reshape(-1)[0]))
