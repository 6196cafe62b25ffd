"""Dictionary metrics with pinned formulas (``sparsen sae eval``).

Over an evaluation set of N tokens (x the input, t the target: x itself for an SAE, t_hat the reconstruction):

- FVU = sum ||t - t_hat||^2 / sum ||t - mean(t)||^2, the mean taken over the whole evaluation set (not per batch,
  not per token; SAELens's "conventional" explained variance measured variance about zero for a year and SAEBench
  still does); explained variance = 1 - FVU.
- L0: mean active latents per token, and its histogram.
- dead fraction: latents that fire on none of the N tokens (N is reported); dense fraction: latents that fire on
  more than ``dense_threshold`` of them.
- shrinkage: l2_ratio = mean over tokens of ||t_hat|| / ||t||; relative_reconstruction_bias = E||t_hat||^2 / E[t.t_hat]
  (1 when unbiased; below 1 when the reconstruction is shrunk).
- spliced-in loss: the model's next-token cross-entropy with t replaced by t_hat (CE_sae), by zeros (CE_zero) and by
  the evaluation set's mean of t (CE_mean); ce_loss_score = (CE_abl - CE_sae) / (CE_abl - CE_clean) for each
  ablation, and the same with KL to the clean model: kl_div_score = (KL_abl - KL_sae) / KL_abl.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsen.models.hookpoints import attach, hook_point, read_activations


class ReconstructionStats:
    """Running sums for the reconstruction metrics (float64), fed batch by batch."""

    def __init__(self, d_sae: int, dense_threshold: float = 0.1):
        self.n = 0
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.sum_t = None
        self.sum_tt = 0.0
        self.sum_err = 0.0
        self.sum_ratio = 0.0
        self.sum_rr = 0.0
        self.sum_tr = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.l0_counts = torch.zeros(d_sae + 1, dtype=torch.long)

    @torch.no_grad()
    def update(self, target: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor) -> None:
        t = target.reshape(-1, target.shape[-1]).double()
        r = recon.reshape(-1, recon.shape[-1]).double()
        f = latents.reshape(-1, latents.shape[-1]) != 0
        self.n += t.shape[0]
        self.sum_t = t.sum(0) if self.sum_t is None else self.sum_t + t.sum(0)
        self.sum_tt += float(t.pow(2).sum())
        self.sum_err += float((t - r).pow(2).sum())
        tn, rn = t.norm(dim=1), r.norm(dim=1)
        self.sum_ratio += float((rn / tn.clamp_min(1e-12)).sum())
        self.sum_rr += float(rn.pow(2).sum())
        self.sum_tr += float((t * r).sum())
        self.fired += f.sum(0)
        self.l0_counts += torch.bincount(f.sum(1), minlength=self.d_sae + 1)

    def result(self) -> dict:
        mean = self.sum_t / self.n
        total_var = self.sum_tt - self.n * float(mean.pow(2).sum())
        fvu = self.sum_err / total_var if total_var > 0 else math.nan
        l0 = torch.arange(self.d_sae + 1, dtype=torch.float64)
        freq = self.fired.double() / self.n
        nz = self.l0_counts.nonzero().flatten()
        return {"tokens": self.n, "fvu": fvu, "explained_variance": 1 - fvu, "mse": self.sum_err / self.n,
                "l0": float((l0 * self.l0_counts).sum() / self.n),
                "l0_histogram": {int(i): int(self.l0_counts[i]) for i in nz},
                "dead_fraction": float((self.fired == 0).double().mean()),
                "dense_fraction": float((freq > self.dense_threshold).double().mean()),
                "dense_threshold": self.dense_threshold,
                "l2_ratio": self.sum_ratio / self.n,
                "relative_reconstruction_bias": self.sum_rr / self.sum_tr if self.sum_tr else math.nan,
                "latent_frequency": freq.tolist()}


def ce_loss_score(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """(CE_abl - CE_sae) / (CE_abl - CE_clean): 1 when splicing in costs nothing, 0 when it is as bad as ablation."""
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean)


def kl_div_score(kl_sae: float, kl_ablated: float) -> float:
    return (kl_ablated - kl_sae) / kl_ablated


def _io(sae):
    cfg = sae.cfg
    return cfg.hook_name, (cfg.hook_name_out or cfg.hook_name)


@torch.no_grad()
def reconstruction_metrics(lm, sae, windows: torch.Tensor, skip_first: int = 1, dense_threshold: float = 0.1,
                           batch_windows: int = 4, progress: bool = True) -> dict:
    """Reconstruction metrics of ``sae`` on the activations of ``windows`` [n, ctx] (positions before
    ``skip_first`` left out, as in the cache the dictionary trained on)."""
    hin, hout = _io(sae)
    points = [hook_point(lm.adapter, hin)] + ([hook_point(lm.adapter, hout)] if hout != hin else [])
    stats = ReconstructionStats(sae.cfg.d_sae, dense_threshold)
    for i in tqdm(range(0, len(windows), batch_windows), desc="sae eval: reconstruction", unit="batch",
                  disable=not progress):
        acts = read_activations(lm.adapter, windows[i:i + batch_windows], points)
        x = acts[hin][:, skip_first:].reshape(-1, sae.cfg.d_in).float()
        t = acts[hout][:, skip_first:].reshape(-1, sae.cfg.out_width).float()
        recon, f = sae(x)
        stats.update(t, recon, f)
    return stats.result()


@torch.no_grad()
def spliced_metrics(lm, sae, windows: torch.Tensor, mean_target: torch.Tensor, skip_first: int = 1,
                    progress: bool = True) -> dict:
    """Next-token CE of the clean model and with the target replaced by the reconstruction, by zeros and by
    ``mean_target``; KL of each to the clean model; the two scores per ablation. Positions before ``skip_first``
    stay clean in every pass (the dictionary never saw them)."""
    hin, hout = _io(sae)
    model = lm.model
    sums = {k: 0.0 for k in ("clean", "sae", "zero", "mean", "kl_sae", "kl_zero", "kl_mean")}
    n = 0
    for w in tqdm(windows, desc="sae eval: spliced loss", unit="window", disable=not progress):
        ids = w[None]
        clean = model(ids).logits[0, :-1].float().log_softmax(-1)
        labels = ids[0, 1:]
        sums["clean"] += float(F.nll_loss(clean, labels, reduction="sum"))
        stash = {}

        def reader(act):
            stash["x"] = act
            return None

        for mode in ("sae", "zero", "mean"):
            def replace(act, mode=mode):
                new = act.clone()
                if mode == "sae":
                    x = stash["x"] if hin != hout else act
                    new[:, skip_first:] = sae(x[:, skip_first:].float()).recon.to(act.dtype)
                elif mode == "zero":
                    new[:, skip_first:] = 0
                else:
                    new[:, skip_first:] = mean_target.to(act.dtype)
                return new

            handles = []
            try:
                if hin != hout and mode == "sae":
                    handles.append(attach(lm.adapter, hin, reader))
                handles.append(attach(lm.adapter, hout, replace))
                logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            finally:
                for h in handles:
                    h.remove()
            sums[mode] += float(F.nll_loss(logp, labels, reduction="sum"))
            sums[f"kl_{mode}"] += float(F.kl_div(logp, clean, log_target=True, reduction="sum"))
        n += labels.numel()
    ce = {k: sums[k] / n for k in ("clean", "sae", "zero", "mean")}
    kl = {k: sums[f"kl_{k}"] / n for k in ("sae", "zero", "mean")}
    return {"predicted_tokens": n, "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"], "kl_sae": kl["sae"], "kl_zero_ablation": kl["zero"],
            "kl_mean_ablation": kl["mean"],
            "ce_loss_score_zero": ce_loss_score(ce["clean"], ce["sae"], ce["zero"]),
            "ce_loss_score_mean": ce_loss_score(ce["clean"], ce["sae"], ce["mean"]),
            "kl_div_score_zero": kl_div_score(kl["sae"], kl["zero"]),
            "kl_div_score_mean": kl_div_score(kl["sae"], kl["mean"])}


@torch.no_grad()
def mean_activation(lm, hook: str, windows: torch.Tensor, skip_first: int = 1, batch_windows: int = 4) -> torch.Tensor:
    """The mean of a hook's activation over ``windows`` (positions from ``skip_first``), float64 sums."""
    p = hook_point(lm.adapter, hook)
    total, n = None, 0
    for i in range(0, len(windows), batch_windows):
        a = read_activations(lm.adapter, windows[i:i + batch_windows], [p])[hook][:, skip_first:]
        a = a.reshape(-1, a.shape[-1]).double()
        total = a.sum(0) if total is None else total + a.sum(0)
        n += a.shape[0]
    return (total / n).float()
