"""Weights tuned to a sparse plan after calibration (``tune_steps`` of any method's config): the transform
'tuned_weights'.

The model runs under the plan's hooks (decode protocol: each window's first half dense, the second sparse) and
two sets of weights are trained by Adam on the KL from the dense model's next-token distribution, one calibration
window per step: the RMSNorm gains, and a rank-``tune_rank`` term B A beside every block linear (B starts at zero).
The term reads the linear's input after the plan's mask, so merged into the weight, W + B A, it skips the same
columns and costs nothing per token; the gains fold into the norms. The thresholds stay as calibrated (the masks
pass gradients to the inputs they keep), so the achieved sparsity moves a little. The transform applies after the
plan's others (a rotation), on the weights they leave.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsen.core.divergence import kl_sum
from sparsen.core.transforms import register_transform
from sparsen.data import corpus_windows
from sparsen.errors import SparsenError
from sparsen.models.adapters import LINEAR_NAMES as LINEARS

TRANSFORM = "tuned_weights"
GAINS = "tune.gains"


def _factor_keys() -> tuple[str, ...]:
    return tuple(f"tune.{f}.{name}" for name in LINEARS for f in ("A", "B"))


def norm_gains(lm) -> list[torch.nn.Parameter]:
    """The gains of every block's two norms and of the final norm, in that order (the adapter names them)."""
    ad = lm.adapter
    return [n.weight for b in ad.blocks for n in (b.attn_norm, b.mlp_norm)] + [ad.final_norm.weight]


def _block_linears(lm) -> dict[str, list[torch.nn.Linear]]:
    """name -> that linear of every block, for the names in LINEARS the model has."""
    blocks = lm.adapter.blocks
    return {name: [b.linears[name] for b in blocks] for name in LINEARS if all(name in b.linears for b in blocks)}


class TunedWeights:
    """Norm gains replaced and a low-rank term added to each block linear. Tensors: tune.gains [n_norms, d] (the
    order of ``norm_gains``), tune.A.NAME [layers, r, in] and tune.B.NAME [layers, out, r] per linear NAME."""

    name = TRANSFORM
    tensor_keys = (GAINS, *_factor_keys())

    def validate(self, tensors: dict) -> None:
        if GAINS not in tensors or tensors[GAINS].dim() != 2:
            raise ValueError("the plan's tuned norm gains are missing from its tensors")
        for name in LINEARS:
            a, b = tensors.get(f"tune.A.{name}"), tensors.get(f"tune.B.{name}")
            if (a is None) != (b is None):
                raise ValueError(f"the plan's tuned term on '{name}' has one factor of two")
            if a is not None and (a.dim() != 3 or b.dim() != 3 or a.shape[:2] != (b.shape[0], b.shape[2])):
                raise ValueError(f"the plan's tuned factors of '{name}' do not fit each other")

    def check_model(self, lm, tensors: dict) -> None:
        gains = norm_gains(lm)
        if tuple(tensors[GAINS].shape) != (len(gains), gains[0].numel()):
            raise SparsenError("the plan's tuned norm gains do not fit this model's norms: recalibrate")
        linears = _block_linears(lm)
        for name in LINEARS:
            if f"tune.A.{name}" not in tensors:
                continue
            a, b = tensors[f"tune.A.{name}"], tensors[f"tune.B.{name}"]
            lins = linears.get(name)
            if lins is None or (a.shape[0], a.shape[2], b.shape[1]) != (len(lins), lins[0].in_features,
                                                                        lins[0].out_features):
                raise SparsenError(f"the plan's tuned term on '{name}' does not fit this model's linears: recalibrate")

    @torch.no_grad()
    def apply_(self, lm, tensors: dict) -> None:
        for p, g in zip(norm_gains(lm), tensors[GAINS]):
            p.copy_(g.to(p.dtype))
        for name, lins in _block_linears(lm).items():
            if f"tune.A.{name}" in tensors:
                for lin, a, b in zip(lins, tensors[f"tune.A.{name}"], tensors[f"tune.B.{name}"]):
                    lin.weight += (b.double() @ a.double()).to(lin.weight.dtype)

    def added_params(self, lm, tensors: dict) -> int:
        return 0  # merged into the weights

    def residual_changes(self, tensors: dict) -> dict:
        return {}


register_transform(TunedWeights())


def kl_to_dense(logits: torch.Tensor, dense_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(dense || sparse) (the dense log-probs may be held in half precision)."""
    return kl_sum(dense_logp.float(), F.log_softmax(logits.float(), -1)) / len(dense_logp)


def tune_plan(lm, plan, config, progress: bool = True) -> None:
    """Tune ``plan`` (just calibrated on ``lm``, which is not changed) by ``config.tune_steps`` steps, and add the
    result to it as the 'tuned_weights' transform. ``plan.params['tuning']`` records the KL on the calibration text's
    first window not tuned on, before and after (None when every window was tuned on)."""
    steps, rank = config.tune_steps, config.tune_rank
    every = corpus_windows(lm.tokenizer, config.corpus, config.ctx, bos=lm.window_bos)
    wins = every[: min(steps, len(every))]  # one window per step; cycled when the text holds fewer
    held = every[steps][None] if steps < len(every) else None
    start, stop = config.ctx // 2, config.ctx - 1  # the decode protocol's scored positions
    if stop - start < 1:
        raise SparsenError(f"ctx {config.ctx} leaves no sparse positions to tune on: use a longer ctx")
    work = lm.copy()  # the caller's model stays as it was
    plan.transform_(work)
    work.model.requires_grad_(False)
    gains = norm_gains(work)
    for p in gains:
        p.requires_grad_(True)
    linears = _block_linears(work)
    g = torch.Generator().manual_seed(0)
    draws = {name: [] for name in linears}  # drawn block by block, as the probe (benchmarks/norm_tuning.py) does
    for i in range(len(work.adapter.blocks)):
        for name, lins in linears.items():
            draws[name].append(torch.randn(rank, lins[i].in_features, generator=g) / lins[i].in_features ** 0.5)
    factors, handles = {}, []  # one leaf per linear: indexing a stacked leaf costs a full-size gradient per use
    for name, lins in linears.items():
        factors[name] = ([a.requires_grad_(True) for a in draws[name]],
                         [torch.zeros(lin.out_features, rank, requires_grad=True) for lin in lins])
        for lin, a, b in zip(lins, *factors[name]):
            handles.append(lin.register_forward_hook(lambda m, args, out, a=a, b=b: out + (args[0] @ a.T) @ b.T))
    extra = [t for ab in factors.values() for ts in ab for t in ts]
    opt = torch.optim.Adam([{"params": gains}, {"params": extra, "lr": config.tune_rank_lr}], lr=config.tune_lr)
    decay = (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if config.tune_schedule == "cosine" else (lambda s: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    sp = plan.build_sparsifier(work)
    sp.dense_prefix = start
    try:
        with sp:
            held_kl = [_held_out_kl(lm, work, held, start, stop)]
            for step in tqdm(range(steps), desc="tune weights", unit="step", disable=not progress, leave=False):
                loss = _window_kl(lm, work, wins[step % len(wins)][None], start, stop)
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
            held_kl.append(_held_out_kl(lm, work, held, start, stop))
    finally:
        for h in handles:
            h.remove()
    tensors = {GAINS: torch.stack([p.detach().float().clone() for p in gains])}
    for name, (a, b) in factors.items():
        tensors[f"tune.A.{name}"], tensors[f"tune.B.{name}"] = torch.stack(a).detach(), torch.stack(b).detach()
    plan.add_transform(TRANSFORM, tensors)
    plan.params["tuning"] = {"steps": steps, "windows": len(wins), "held_out_kl_before": held_kl[0],
                             "held_out_kl_after": held_kl[1]}


def _window_kl(lm, work, window, start: int, stop: int) -> torch.Tensor:
    """KL of ``work`` (under its attached hooks) from the dense ``lm`` on one window's scored positions (the gradient
    flows through ``work`` only)."""
    with torch.no_grad():
        dense_logp = F.log_softmax(_scored_logits(lm.model, window, start, stop).float(), -1)
    return kl_to_dense(_scored_logits(work.model, window, start, stop), dense_logp)


def _scored_logits(model, window, start: int, stop: int) -> torch.Tensor:
    """Logits at positions [start, stop) of one window [1, ctx]; the unembedding runs on those positions only."""
    return model(window, logits_to_keep=window.shape[-1] - start).logits[0, : stop - start]


@torch.no_grad()
def _held_out_kl(lm, work, window, start: int, stop: int) -> float | None:
    return None if window is None else float(_window_kl(lm, work, window, start, stop))
